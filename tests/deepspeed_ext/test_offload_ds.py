"""``"longkit": {"activation_offload": {...}}`` in a DeepSpeed config: the section parses (and refuses bad values),
``SequenceParallel.prepare_model`` installs it, and on 2 gloo processes Ulysses SP=2 + offload gives the same losses,
gradients and weights as Ulysses alone (ZeRO 1, 2 and 3, with and without gradient checkpointing).

The distributed part runs this file as its own worker (``python -m torch.distributed.run ... test_offload_ds.py``).
Offload only moves saved tensors to host memory and back, so the numbers are compared to 1e-6 relative (bitwise in
practice on CPU).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCENARIOS = {
    # name: (model_type, batch kind, B, T, zero stage, gradient checkpointing)
    "llama_z1": ("llama", "plain", 2, 32, 1, False),
    "qwen3_z3": ("qwen3", "plain", 2, 30, 3, False),
    "llama_z2_ckpt_packed": ("llama", "packed", 1, 40, 2, True),
}
MIN_BYTES = 1024  # below one tiny-model weight matrix (64 x 64 x 4 bytes): a weight that slipped through would show


# ------------------------------------------------------------------------------------------ section parsing
def _parse(section):
    from longkit.deepspeed_ext import parse_ds_config

    return parse_ds_config({"train_micro_batch_size_per_gpu": 1, "longkit": section}).activation_offload


def test_section_parses_valid_values(tmp_path: Path) -> None:
    from longkit.config import ActivationOffloadConfig
    from longkit.deepspeed_ext import parse_ds_config

    assert _parse({}) == ActivationOffloadConfig(enabled=False)  # no key: off
    assert _parse({"activation_offload": {}}) == ActivationOffloadConfig()  # the key: on, defaults
    full = {"enabled": True, "min_tensor_bytes": 4096, "gpu_fraction": 0.25, "prefetch": False, "pin_memory": False}
    want = ActivationOffloadConfig(True, 4096, 0.25, False, False)
    assert _parse({"activation_offload": full}) == want
    assert _parse({"activation_offload": {"enabled": False, "gpu_fraction": 0.5}}).enabled is False
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"longkit": {"sequence_parallel": {"size": 2}, "activation_offload": full}}))
    parsed = parse_ds_config(path)
    assert parsed.activation_offload == want and parsed.sequence_parallel.size == 2


@pytest.mark.parametrize("value, words", [
    (None, "longkit.activation_offload must be an object, got NoneType. Example: "),
    (True, "longkit.activation_offload must be an object, got bool"),
    ([{"enabled": True}], "longkit.activation_offload must be an object, got list"),
    ({"gpu_frac": 0.5}, "unknown key(s) ['gpu_frac'] in longkit.activation_offload; allowed keys: ['enabled', "
                        "'min_tensor_bytes', 'gpu_fraction', 'prefetch', 'pin_memory']. Example: "),
    ({"enabled": "true"}, "longkit.activation_offload.enabled must be true or false, got 'true' (str)"),
    ({"min_tensor_bytes": -4}, "longkit.activation_offload.min_tensor_bytes must be an int >= 0"),
    ({"min_tensor_bytes": 1e6}, "longkit.activation_offload.min_tensor_bytes must be an int >= 0 (bytes; e.g. "
                                "1048576 for 1 MiB), got 1000000.0 (float)"),
    ({"gpu_fraction": 1.01}, "longkit.activation_offload.gpu_fraction must be a number in [0.0, 1.0], got 1.01"),
    ({"gpu_fraction": "0.5"}, "longkit.activation_offload.gpu_fraction must be a number in [0.0, 1.0], got '0.5'"),
    ({"prefetch": 1}, "longkit.activation_offload.prefetch must be true or false, got 1 (int)"),
    ({"pin_memory": None}, "longkit.activation_offload.pin_memory must be true or false, got None"),
    # disabled, but still checked: a bad value must not wait until someone turns it on
    ({"enabled": False, "gpu_fraction": -1}, "longkit.activation_offload.gpu_fraction must be a number"),
])
def test_section_rejects_bad_values(value, words: str) -> None:
    from longkit.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _parse({"activation_offload": value})
    assert words in str(e.value)


def test_sequence_parallel_prepares_offload() -> None:
    """from_ds_config carries the offload options; prepare_model installs them (any SP size), once;
    unprepare_model removes them; a model already offloaded with other options is refused."""
    from longkit.config import ActivationOffloadConfig
    from longkit.deepspeed_ext import SequenceParallel, SequenceParallelConfig
    from longkit.errors import ConfigError
    from longkit.offload import ActivationOffloader, get_offloader
    from tests.utils import tiny_model

    warnings.filterwarnings("ignore", message="longkit activation offload: CUDA is not available")
    model = tiny_model("llama")
    sp = SequenceParallel.from_ds_config({"longkit": {"activation_offload": {"gpu_fraction": 0.5}}})
    assert sp.activation_offload == ActivationOffloadConfig(gpu_fraction=0.5)
    sp.prepare_model(model)
    off = get_offloader(model)
    assert off is not None and off.config.gpu_fraction == 0.5
    sp.prepare_model(model)
    assert get_offloader(model) is off
    sp.unprepare_model(model)
    assert get_offloader(model) is None
    SequenceParallel.from_ds_config({"longkit": {}}).prepare_model(model)
    assert get_offloader(model) is None
    ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=0))
    with pytest.raises(ConfigError, match="already has activation offload with .* the DeepSpeed config asks for"):
        sp.prepare_model(model)
    with pytest.raises(ConfigError, match="activation_offload must be an ActivationOffloadConfig or None, got dict"):
        SequenceParallel(SequenceParallelConfig(), {"enabled": True})


# ------------------------------------------------------------------------------------------ gloo run
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="install the train extra: pip install -e '.[train]'")
    seed = int.from_bytes(os.urandom(2), "little")
    out = tmp_path_factory.mktemp("offload") / "res.json"
    env = {**os.environ, "LONGKIT_SP_SEED": str(seed), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(30500 + seed % 1000), str(Path(__file__).resolve()), str(out), *SCENARIOS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"seed {seed}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return seed, [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ulysses_with_offload_equals_ulysses_alone(results, name: str) -> None:
    seed, per_rank = results
    ckpt = SCENARIOS[name][-1]
    for rank, res in enumerate(per_rank):
        r = res[name]
        assert "error" not in r, f"seed {seed} rank {rank}: {r.get('trace', r['error'])}"
        for a, b in zip(r["ref_losses"], r["off_losses"], strict=True):
            assert abs(a - b) <= 1e-6 * abs(a), (seed, rank, r)
        assert r["max_grad_err"] <= 1e-6 * r["grad_scale"], (seed, rank, r)
        assert r["max_param_err"] <= 1e-6, (seed, rank, r)
        assert r["param_hits"] == [], (seed, rank, r["param_hits"])  # no parameter was ever copied
        stats = r["stats"]
        assert stats[0]["bytes_offloaded_last_forward"] > 0 and stats[0]["pool_bytes_in_use"] == 0, (seed, r)
        keys = ("pool_buffers", "pool_bytes", "buffers_allocated")
        assert [s[k] for s in stats for k in keys] == [stats[0][k] for _ in stats for k in keys], stats  # reused
        if ckpt:  # each layer offloads exactly its checkpointed input shard [B, T/2, hidden] (fp32): no weight
            hidden = r["local_tokens"] * r["batch"] * r["hidden"] * 4
            assert stats[0]["bytes_offloaded_by_layer"] == {"0": hidden, "1": hidden}, (seed, rank, stats[0])


# ------------------------------------------------------------------------------------------ worker
def _run(name: str, seed: int) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from longkit.deepspeed_ext import initialize
    from longkit.offload import get_offloader
    from tests.deepspeed_ext.sp_worker import make_batch
    from tests.utils import tiny_model

    model_type, kind, B, T, stage, ckpt = SCENARIOS[name]
    torch.manual_seed(seed)
    model = tiny_model(model_type).train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [make_batch(kind, B, T, model.config.vocab_size, gen) for _ in range(2)]
    runs = {}
    for arm in ("ref", "off"):
        section = {"sequence_parallel": {"mode": "ulysses", "size": 2}}
        if arm == "off":
            section["activation_offload"] = {"min_tensor_bytes": MIN_BYTES}
        config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage}, "longkit": section}
        m = copy.deepcopy(model)
        engine, *_, sp = initialize(m, config, model_parameters=m.parameters())
        assert (get_offloader(engine.module) is not None) == (arm == "off")
        if arm == "off":  # record any copied tensor that shares storage with a parameter (ZeRO-3: gathered now)
            off, params, param_hits = get_offloader(engine.module), list(engine.module.parameters()), []
            copy_out = off._copy_out

            def spy(t, group, copy_out=copy_out, params=params, hits=param_hits):
                if t.untyped_storage().data_ptr() in {p.untyped_storage().data_ptr() for p in params if p.numel()}:
                    hits.append(list(t.shape))
                return copy_out(t, group)

            off._copy_out = spy
        losses, stats, grads, local = [], [], None, 0
        for step, batch in enumerate(batches):
            shard = sp.shard_batch(batch)
            local = int(shard["input_ids"].shape[1])
            loss = engine(**shard).loss
            engine.backward(loss)
            losses.append(float(loss.detach()))
            if step == 0:
                grads = {n: safe_get_full_grad(p).float().clone() for n, p in engine.module.named_parameters()}
            engine.step()
            if arm == "off":
                stats.append(get_offloader(engine.module).stats())
        params = [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]
        runs[arm] = (losses, grads, params, stats, local)
    ref_losses, ref_grads, ref_params, _, local = runs["ref"]
    off_losses, off_grads, off_params, stats, _ = runs["off"]
    return {"ref_losses": ref_losses, "off_losses": off_losses,
            "max_grad_err": max((off_grads[n] - g).abs().max().item() for n, g in ref_grads.items()),
            "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
            "max_param_err": max((a - b).abs().max().item() for a, b in zip(ref_params, off_params)),
            "stats": stats, "param_hits": param_hits, "local_tokens": local, "batch": B,
            "hidden": model.config.hidden_size}


def main() -> None:
    warnings.filterwarnings("ignore", message="longkit activation offload: CUDA is not available")
    out_path, names = sys.argv[1], sys.argv[2:]
    seed = int(os.environ.get("LONGKIT_SP_SEED", "1234"))
    results = {}
    for name in names:
        try:
            results[name] = _run(name, seed)
        except Exception as e:  # reported per scenario so one failure does not hide the others
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    with open(f"{out_path}.rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
