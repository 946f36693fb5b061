"""Recall beyond the window: vanilla attention vs LM-Infinite vs LM-Infinite + memory blocks, in one process.

The model is the embedded default, SmolLM2-135M-Instruct (pretrained for ``P = 8192`` positions). Three methods:

* ``vanilla``: the model's own attention (SDPA), full KV cache: the baseline;
* ``lm_infinite``: ``apply_patches(model, lm_infinite=LMInfiniteConfig(n_global, n_local))``;
* ``memory``: the same plus ``memory=MemoryConfig(block_size, repr_keys, topk, chunk_size, distance)``.

Tasks (greedy decoding; real text, available offline):

* **passkey**: the sentence ``The secret number is NNNNN. Remember it. NNNNN is the secret number.`` hidden at a
  depth of a filler of real text: the Python documentation that ships with the standard library
  (``pydoc_data.topics``, the language reference in English prose with code examples, ~113k tokens; the seed picks
  the key and where in it the filler starts), then ``What is the secret number?``; the answer is primed with ``The
  secret number is``. Found = the 5 digits appear in the answer. (Not "pass key": in Python text ``pass`` is a
  keyword, and this model often answers "The pass key is a Python feature ...": vanilla missed "pass key" 1k tokens
  back in a 2k prompt and at 2k-3.6k back in 4k prompts, and found "secret number" at every depth of 2k and 4k.)
* **qa**: a real stdlib file (the largest ones, ``_pydecimal.py`` first) cut to the length, and a question whose
  answer is the name of a function defined at the given depth: ``Which function is defined right after the line
  "<the line just before its def>"?`` (a line that occurs once in the prompt). Found = the name appears in the
  answer (primed with ``The function is named``).
* **ppl**: perplexity per ``--bucket`` tokens over one forward of the first ``--ppl-length`` tokens of
  ``_pydecimal.py`` (LM-Infinite and memory run the whole forward through their patched attention).

    # CPU check of the script (seconds): a tiny random Llama, byte tokenizer
    python benchmarks/long_recall.py --dry-run --out-dir /tmp/recall
    # small run with the real model on CPU (minutes): 4k tokens, 2 depths, 1 seed
    python benchmarks/long_recall.py --quick
    # the measurement (CUDA): 8k/16k/32k, 5 depths x 2 seeds, QA, perplexity to 32k
    python benchmarks/long_recall.py

How to read it: per method, the fraction of prompts answered, per length and depth (passkey) and per length (QA);
LM-Infinite alone can only answer when the key is inside its last ``n_local`` tokens (or among the first
``n_global``); memory should answer at every depth. Perplexity per bucket: memory should match LM-Infinite (the
window still dominates next-token prediction); vanilla breaks past about ``1.3 P``. Greedy decoding, one run per
prompt: differences of one prompt are noise.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import env_info, print_table, save_results  # noqa: E402

METHODS = ("vanilla", "lm_infinite", "memory")
# "secret number", not the usual "pass key": the filler is Python documentation, where "pass" is a keyword (see the
# module docstring).
KEY_SENTENCE = "The secret number is {key}. Remember it. {key} is the secret number."
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
QUESTION = "\nWhat is the secret number?"
ANSWER_PREFIX = "The secret number is"
QA_PREFIX = "The function is named"
DRY_PRETRAIN = 64


# ---------------------------------------------------------------------------------------------- model and text
class ByteTokenizer:
    """Bytes as token ids (vocabulary 256), for the dry run's tiny random model."""

    vocab_size = 256
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8", errors="replace"))}

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def load(dry_run: bool, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the default model, or the dry run's tiny random Llama (fixed weights)."""
    if dry_run:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=DRY_PRETRAIN)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), ByteTokenizer()
    from longkit.models import load_default

    model, tok = load_default(dtype=dtype, device=device)
    tok.model_max_length = 1 << 30
    return model, tok


def stdlib_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def filler_stream(tok: Any, n_tokens: int) -> list[int]:
    """Token ids of the Python documentation shipped with the standard library (``pydoc_data.topics``: the
    language reference's topics, English prose with code examples, in topic order), repeated if shorter than
    ``n_tokens``."""
    from pydoc_data.topics import topics

    ids = tok("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)["input_ids"]
    return (ids * (n_tokens // len(ids) + 1)) if len(ids) < n_tokens else ids


def _chat(tok: Any, user: str, prefix: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
    return tok(text + prefix, add_special_tokens=False)["input_ids"]


def passkey_prompt(tok: Any, stream: list[int], length: int, depth: float, seed: int) -> dict[str, Any]:
    """A ~``length``-token prompt with the key at ``depth`` of the filler; the key and its token index."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    sentence = "\n" + KEY_SENTENCE.format(key=key) + "\n"
    fixed = len(_chat(tok, INTRO + sentence + QUESTION, ANSWER_PREFIX))
    n_fill = max(2, length - fixed)
    start = rng.randrange(0, max(1, len(stream) - n_fill))
    fill = stream[start:start + n_fill]
    cut = round(depth * len(fill))
    before, after = tok.decode(fill[:cut]), tok.decode(fill[cut:])
    ids = _chat(tok, INTRO + before + sentence + after + QUESTION, ANSWER_PREFIX)
    key_at = len(_chat(tok, INTRO + before, "")) - 2  # the chat suffix is a few tokens: close enough for a report
    return {"ids": ids, "answer": key, "key_pos": max(0, key_at)}


_DEF = re.compile(r"^\s*def ([A-Za-z_][A-Za-z0-9_]*)\(", re.M)


def qa_prompt(tok: Any, length: int, depth: float) -> dict[str, Any] | None:
    """A stdlib file cut to ~``length`` tokens, asking which function follows a given line at ``depth``."""
    for p in sorted(stdlib_files(), key=lambda p: (p.name != "_pydecimal.py", -p.stat().st_size, p.name)):
        ids = tok(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            continue
        text = tok.decode(ids[:max(1, length - 80)])
        lines = text.split("\n")
        target = int(depth * len(text))
        best = None
        offset = 0
        for i, line in enumerate(lines):
            m = _DEF.match(line)
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if m and prev.strip() and text.count(prev.strip()) == 1 and len(prev.strip()) >= 12:
                if best is None or abs(offset - target) < abs(best[0] - target):
                    best = (offset, m.group(1), prev.strip())
            offset += len(line) + 1
        if best is None:
            continue
        _, name, prev = best
        question = (f"\n\nIn the code above, which function is defined right after the line \"{prev}\"? "
                    "Answer with its name.")
        out = _chat(tok, text + question, QA_PREFIX)
        return {"ids": out, "answer": name, "key_pos": len(tok(text[:best[0]], add_special_tokens=False)["input_ids"]),
                "file": p.name}
    return None


# ---------------------------------------------------------------------------------------------- methods
def method_context(model: Any, method: str, args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    import longkit
    from longkit.config import MemoryConfig

    if method == "vanilla":
        return contextlib.nullcontext(model)
    lm = longkit.LMInfiniteConfig(n_global=args.n_global, n_local=args.n_local)
    if method == "lm_infinite":
        return longkit.patched(model, lm_infinite=lm)
    mem = MemoryConfig(block_size=args.block_size, repr_keys=args.repr_keys, topk=args.topk,
                       chunk_size=args.chunk_size, distance=args.distance, reselect_every=args.reselect_every)
    return longkit.patched(model, lm_infinite=lm, memory=mem)


def generate(model: Any, tok: Any, ids: list[int], max_new_tokens: int, device: torch.device) -> str:
    x = torch.tensor(ids, device=device)[None]
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, x.shape[1]:].tolist(), skip_special_tokens=True)


def bucket_ppl(model: Any, ids: torch.Tensor, bucket: int) -> list[float]:
    from longkit.demo import bucket_ppl as buckets
    from longkit.demo import per_token_nll

    return buckets(per_token_nll(model, ids.to(model.device), desc="ppl").cpu(), bucket)


@contextlib.contextmanager
def shared_selection(enabled: bool):
    """``--share-heads`` (an experiment, not a library option): one block selection per layer, the block scores
    summed over the KV heads (InfLLM shares its memory units across a layer's heads), instead of one per KV head."""
    if not enabled:
        yield
        return
    from longkit.hf_patches.inf_memory import attention as A

    per_head = A.score_blocks

    def per_layer(*a: Any, **k: Any) -> torch.Tensor:
        s = per_head(*a, **k)
        return s.sum(dim=1, keepdim=True).expand_as(s).contiguous()

    A.score_blocks = per_layer
    try:
        yield
    finally:
        A.score_blocks = per_head


@contextlib.contextmanager
def key_block_probe(args: argparse.Namespace, n_layers: int):
    """``--diagnose``: record every block scoring of the memory attention; yields a function that, given the key's
    token index, says how often its block was among the top-k (last prefill chunk of each layer; first decode step)
    and its median rank there. Tells retrieval misses (wrong blocks) from reading misses (right blocks, wrong
    answer)."""
    from longkit.hf_patches.inf_memory import attention as A

    records: list[tuple[str, torch.Tensor]] = []
    phase = {"now": ""}
    orig = (A.score_blocks, A._prefill, A._decode_step)

    def prefill(*a: Any, **k: Any) -> Any:
        phase["now"] = "prefill"
        return orig[1](*a, **k)

    def decode(*a: Any, **k: Any) -> Any:
        phase["now"] = "decode"
        return orig[2](*a, **k)

    def score(*a: Any, **k: Any) -> torch.Tensor:
        out = orig[0](*a, **k)
        records.append((phase["now"], out.float().cpu()))
        return out

    def report(key_pos: int) -> dict[str, Any]:
        m = (key_pos - args.n_global) // args.block_size
        pre = [s for p, s in records if p == "prefill"]
        dec = [s for p, s in records if p == "decode"]
        out: dict[str, Any] = {"key_block": m}
        groups = {"last_prefill_chunk": pre[len(pre) // n_layers - 1::len(pre) // n_layers] if pre else [],
                  "first_decode_step": dec[:n_layers]}
        for name, group in groups.items():
            ranks = [(s > s[..., m:m + 1]).sum(-1).flatten() for s in group if s.shape[-1] > m
                     and bool((s[..., m] > float("-inf")).all())]
            if ranks:
                r = torch.cat(ranks)
                out[name] = {"in_topk": round(float((r < args.topk).float().mean()), 3),
                             "median_rank": int(r.median())}
        records.clear()
        return out

    A.score_blocks, A._prefill, A._decode_step = score, prefill, decode
    try:
        yield report
    finally:
        A.score_blocks, A._prefill, A._decode_step = orig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default 8192 16384 32768)")
    ap.add_argument("--depths", type=float, nargs="+", help="key depths (default 0.1 0.3 0.5 0.7 0.9)")
    ap.add_argument("--seeds", type=int, default=None, help="passkey prompts per length and depth (default 2)")
    ap.add_argument("--qa-depths", type=float, nargs="*", default=None,
                    help="depths of the QA variant's function (default 0.3 0.5 0.7; none: skip)")
    ap.add_argument("--ppl-length", type=int, default=None, help="perplexity document length (default 32768; 0: skip)")
    ap.add_argument("--bucket", type=int, default=1024)
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=None, help="LM-Infinite window (default 2048)")
    ap.add_argument("--block-size", type=int, default=None, help="memory block size (default 128)")
    ap.add_argument("--repr-keys", type=int, default=4)
    ap.add_argument("--topk", type=int, default=None, help="blocks retrieved per chunk (default 16)")
    ap.add_argument("--chunk-size", type=int, default=None, help="retrieval chunk in prefill (default 512)")
    ap.add_argument("--distance", type=int, default=None, help="memory distance (default LM-Infinite's limit)")
    ap.add_argument("--reselect-every", type=int, default=None, help="decode steps between block selections")
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--share-heads", action="store_true", help="experiment: one block selection per layer (scores "
                    "summed over KV heads)")
    ap.add_argument("--diagnose", action="store_true",
                    help="memory: report where the key's block ranked in the block selection of each prompt")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 (dry run: fp32)")
    ap.add_argument("--device", default=None, help="default cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default torch's choice; 1 is much faster on a CPU other jobs share)")
    ap.add_argument("--quick", action="store_true", help="real model, 4k, depths 0.3 0.7, 1 seed, no QA, ppl to 4k")
    ap.add_argument("--dry-run", action="store_true", help="tiny random Llama + byte tokenizer (checks the script)")
    ap.add_argument("--name", default=None, help="results file name (default long_recall_<device>)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    preset: dict[str, Any] = {"lengths": [8192, 16384, 32768], "depths": [0.1, 0.3, 0.5, 0.7, 0.9], "seeds": 2,
                              "qa_depths": [0.3, 0.5, 0.7], "ppl_length": 32768, "n_local": 2048, "block_size": 128,
                              "topk": 16, "chunk_size": 512, "reselect_every": 1}
    if args.quick:
        preset.update(lengths=[4096], depths=[0.3, 0.7], seeds=1, qa_depths=[], ppl_length=4096, n_local=1024)
    if args.dry_run:
        preset.update(lengths=[640], depths=[0.3, 0.7], seeds=1, qa_depths=[0.5], ppl_length=512, n_local=64,
                      block_size=8, topk=2, chunk_size=32, bucket=128)
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.dry_run and args.bucket == 1024:
        args.bucket = preset["bucket"]
    for name in ("lengths",):
        if any(x < 16 for x in getattr(args, name)):
            ap.error(f"--{name} must be >= 16 tokens")
    if any(not 0 <= d <= 1 for d in args.depths + args.qa_depths):
        ap.error("depths must be fractions in [0, 1]")
    if args.seeds < 1 or args.bucket < 1 or args.ppl_length < 0 or args.max_new_tokens < 1:
        ap.error("--seeds, --bucket and --max-new-tokens must be >= 1 and --ppl-length >= 0")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if (args.dtype or ("fp32" if args.dry_run else "bf16")) == "fp32" else torch.bfloat16
    try:  # check the method options before loading anything
        from longkit.config import MemoryConfig

        MemoryConfig(block_size=args.block_size, repr_keys=args.repr_keys, topk=args.topk,
                     chunk_size=args.chunk_size, distance=args.distance, reselect_every=args.reselect_every)
    except ValueError as e:
        raise SystemExit(f"bad memory option: {e}") from None
    t_load = time.perf_counter()
    model, tok = load(args.dry_run, dtype, device)
    pretrain = int(model.config.max_position_embeddings)
    print(f"model: {'tiny random Llama (dry run)' if args.dry_run else 'SmolLM2-135M-Instruct'}, pretraining length "
          f"{pretrain}, {dtype}, {device}; loaded in {time.perf_counter() - t_load:.0f} s")
    stream = filler_stream(tok, max(args.lengths) * 3)
    rows: list[dict[str, Any]] = []
    prompts = []
    for length in args.lengths:
        for depth in args.depths:
            for seed in range(args.seeds):
                prompts.append(("passkey", length, depth, seed, passkey_prompt(tok, stream, length, depth, seed)))
        for depth in args.qa_depths:
            qa = qa_prompt(tok, length, depth)
            if qa is not None:
                prompts.append(("qa", length, depth, 0, qa))
    n_layers = int(model.config.num_hidden_layers)
    for method in args.methods:
        probe = (key_block_probe(args, n_layers) if args.diagnose and method == "memory"
                 else contextlib.nullcontext(None))
        with method_context(model, method, args), shared_selection(args.share_heads), probe as report:
            for task, length, depth, seed, pr in prompts:
                _sync(device)
                t0 = time.perf_counter()
                try:
                    answer, error = generate(model, tok, pr["ids"], args.max_new_tokens, device), None
                except Exception as exc:  # noqa: BLE001 - report and go on: one failing method must not hide the others
                    answer, error = "", f"{type(exc).__name__}: {exc}"
                _sync(device)
                found = pr["answer"] in answer
                n = len(pr["ids"])
                diag = report(pr["key_pos"]) if report is not None else None
                rows.append({"task": task, "method": method, "length": length, "prompt_tokens": n, "depth": depth,
                             "seed": seed, "key_pos": pr["key_pos"], "key_back": n - pr["key_pos"],
                             "answer": answer, "expected": pr["answer"], "found": found, "error": error,
                             "seconds": round(time.perf_counter() - t0, 2), "diagnosis": diag})
                print(f"  {method:>11} {task:>7} len={n:>6} depth={depth:.2f} seed={seed} "
                      f"{'FOUND' if found else 'miss '} {answer!r}" + (f" [{error}]" if error else "")
                      + (f" {diag}" if diag else ""), flush=True)
    summary = []
    for task in ("passkey", "qa"):
        for length in args.lengths:
            sel = [r for r in rows if r["task"] == task and r["length"] == length]
            if not sel:
                continue
            for depth in sorted({r["depth"] for r in sel}):
                row: dict[str, Any] = {"task": task, "length": length, "depth": depth}
                for method in args.methods:
                    got = [r["found"] for r in sel if r["method"] == method and r["depth"] == depth]
                    row[method] = f"{sum(got)}/{len(got)}"
                summary.append(row)
    print_table(summary, ["task", "length", "depth", *args.methods],
                title=f"answers found (n_local={args.n_local}, topk={args.topk}, block={args.block_size})")
    ppl: dict[str, list[float]] = {}
    if args.ppl_length:
        from longkit.models import find_text_document

        if args.dry_run:
            doc = torch.tensor(stream[:args.ppl_length])
        else:
            _, text = find_text_document(args.ppl_length + 1, tok)
            doc = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:args.ppl_length])
        for method in args.methods:
            with method_context(model, method, args):
                ppl[method] = bucket_ppl(model, doc, args.bucket)
        table = [{"tokens": f"{k * args.bucket}-{min((k + 1) * args.bucket, args.ppl_length)}",
                  **{m: ppl[m][k] for m in args.methods}} for k in range(len(ppl[args.methods[0]]))]
        print_table(table, ["tokens", *args.methods], title=f"perplexity per {args.bucket}-token bucket")
    tag = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "_", env_info()["device"].lower()).strip("_")
    name = args.name or f"long_recall_{tag}{'_dry_run' if args.dry_run else ''}"
    extra = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "pretrain_len": pretrain, "summary": summary, "ppl": ppl,
             "ppl_finite": {m: all(math.isfinite(x) for x in v) for m, v in ppl.items()}}
    return save_results(name, rows, extra, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
