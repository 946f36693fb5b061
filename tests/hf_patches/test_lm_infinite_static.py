"""LM-Infinite static decode path (``LMInfiniteConfig(decode="static" | "cuda_graph")``), on CPU.

* the static cache gives the same greedy tokens and logits as the existing bounded cache, across ring
  wrap-around, left padding, short prompts (the ring fills during decoding) and chunked prefill;
* the decode step is capture-safe: through ``generate()``'s real ``get_compiled_call`` route, an instrumented
  :class:`DecodeGraphRunner` records every aten op of the captured step and of each "replay" and checks that
  no op reads the device from the host, that every replay runs the identical op sequence (shapes, strides
  and scalar arguments), and that no tensor from outside the step (other than the static inputs, the cache
  buffers and the weights) is read: the conditions for CUDA-graph replay to equal eager execution.
  HF's own ``StaticCache`` (the vanilla baseline of the benchmark) is checked the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig

import longkit
from longkit import ConfigError, LMInfiniteConfig, UnsupportedModelError
from longkit.hf_patches.decode_graph import DecodeGraphRunner, graphed_decode, install_runner
from longkit.hf_patches.lm_infinite import patch as lmi
from longkit.hf_patches.lm_infinite import static_cache as lms
from longkit.hf_patches.lm_infinite.static_cache import LMInfiniteStaticCache
from tests.utils import left_padded, tiny_model

aten = torch.ops.aten
# Ops that read device memory on the host (a sync, illegal while capturing) or create a tensor from host data
# (a host-to-device copy from pageable memory, also illegal while capturing).
_FORBIDDEN = {aten._local_scalar_dense.default, aten.nonzero.default, aten.lift_fresh.default,
              aten.lift_fresh_copy.default, aten.equal.default, aten.is_nonzero.default}


def _generate(model, ids, mask, cfg, n_new):
    longkit.apply_patches(model, lm_infinite=cfg)
    return model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)


CASES = {
    "leftpad-long": [26, 17, 30],  # prompts longer than sink + ring: the ring is full from the first step
    "leftpad-short": [5, 3, 8],  # the ring fills while decoding (masked phase, then the unmasked one)
    "nopad": [23],
}


# --------------------------------------------------------------------------- equivalence with the eager path
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("case", list(CASES))
def test_static_generate_equals_eager_bounded_cache(model_type, case):
    model = tiny_model(model_type)
    model.generation_config.eos_token_id = None  # rows must not stop early
    ids, mask = left_padded(model.config.vocab_size, CASES[case])
    n_global, n_local, n_new = 3, 12, 40  # 40 new tokens: the 12-slot ring wraps several times
    ref = _generate(model, ids, mask, LMInfiniteConfig(n_global=n_global, n_local=n_local), n_new)
    out = _generate(model, ids, mask, LMInfiniteConfig(n_global=n_global, n_local=n_local, decode="static"), n_new)
    assert isinstance(out.past_key_values, LMInfiniteStaticCache)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-5, rtol=1e-5)
    cache = out.past_key_values
    assert cache.stored_tokens() == n_global + n_local
    layer = cache.layers[0]
    assert layer.keys.shape[2] == 2 * n_global + n_local and layer.values.shape[2] == n_global + n_local


def test_static_chunked_prefill_then_decode_equals_full_forward():
    """Prompt in two chunks (the second attends to the first through explicit positions), then one token at a
    time, with left padding: every real position's logits equal one full LM-Infinite forward."""
    model = tiny_model("llama")
    cfg = LMInfiniteConfig(n_global=3, n_local=10, decode="static")
    longkit.apply_patches(model, lm_infinite=cfg)
    ids, mask = left_padded(model.config.vocab_size, [36, 29])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = LMInfiniteStaticCache(model.config.num_hidden_layers, 3, 10, mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        steps = [model(ids[:, :14], attention_mask=mask[:, :14], position_ids=pos[:, :14],
                       past_key_values=cache).logits,
                 model(ids[:, 14:21], attention_mask=mask[:, :21], position_ids=pos[:, 14:21],
                       past_key_values=cache).logits]
        for t in range(21, 36):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                               past_key_values=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 36 and cache.stored_tokens() == 13


# --------------------------------------------------------------------------- capture safety
def _sig(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, tuple(x.stride()))
    if isinstance(x, (list, tuple)):
        return tuple(_sig(y) for y in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _sig(v)) for k, v in x.items()))
    return x


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _StepTrace(TorchDispatchMode):
    """Records (op, argument signature); raises on host reads and on reads of tensors from outside the step."""

    def __init__(self, allowed: set[int]):
        super().__init__()
        self.allowed, self.made, self.ops = set(allowed), set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FORBIDDEN:
            raise AssertionError(f"decode step reads the device from the host or copies host data: {func}")
        for a in [*args, *kwargs.values()]:
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor) and t.numel() > 0 and t.dim() > 0:
                    ptr = _storage(t)
                    if ptr not in self.allowed and ptr not in self.made:
                        raise AssertionError(f"{func} reads a tensor {tuple(t.shape)} from outside the step: a graph "
                                             "would replay it with stale contents")
        self.ops.append((str(func), _sig(args), _sig(kwargs)))
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor):
                self.made.add(_storage(t))
        return out


def _cache_tensors(cache) -> list[torch.Tensor]:
    """The tensors a cache's layers and shared bookkeeping hold, and those of the dataclasses they hold (a quantized
    layer's packed records and quantizer state)."""
    objs = [*cache.layers, getattr(cache, "shared", None)]
    values = [v for o in objs if o is not None for v in vars(o).values()]
    values += [getattr(v, f.name) for v in values if dataclasses.is_dataclass(v) for f in dataclasses.fields(v)]
    return [v for v in values if isinstance(v, torch.Tensor)]


class _FakeGraph:
    def __init__(self, run, trace: list, out, allowed: set[int], capturing):
        self.run, self.trace, self.out, self.allowed, self.capturing = run, trace, out, allowed, capturing
        self.replays = 0

    def replay(self) -> None:
        with self.capturing(), torch.no_grad(), _StepTrace(self.allowed) as tr:
            res = self.run()
        assert tr.ops == self.trace, "a replay ran a different op sequence than the captured step"
        self.out.logits.copy_(res.logits)
        self.replays += 1


class _CheckingRunner(DecodeGraphRunner):
    """DecodeGraphRunner whose "graphs" re-run the forward under _StepTrace and compare with the capture."""

    def __init__(self, model, accept, monkeypatch):
        super().__init__(model, accept)
        self._mp = monkeypatch

    def _device_ok(self, ids):
        return True

    def _warm_step(self, model, kwargs):
        self.stats["warmup"] += 1
        return model(**kwargs)

    def _capturing(self):
        mp = self._mp

        class _Ctx:
            def __enter__(self):
                mp.setattr(lms, "_capturing", lambda: True)

            def __exit__(self, *exc):
                mp.setattr(lms, "_capturing", lambda: False)

        return _Ctx()

    def _capture(self, model, cache, tensors, consts, key):
        static_in = {k: v.clone() if isinstance(v, torch.Tensor) else {n: x.clone() for n, x in v.items()}
                     for k, v in tensors.items()}
        state = [(t, t.clone()) for t in _cache_tensors(cache)]
        statics = [t for v in static_in.values() for t in ([v] if isinstance(v, torch.Tensor) else v.values())]
        allowed = {_storage(t) for t in [*model.parameters(), *model.buffers(), *_cache_tensors(cache), *statics]}

        def run():
            return model(**consts, **static_in, past_key_values=cache)

        with self._capturing(), torch.no_grad(), _StepTrace(allowed) as tr:
            out = run()
        for t, saved in state:  # a real capture does not execute: undo what this one did
            t.copy_(saved)
        self.stats["captures"] += 1
        entry = (static_in, _FakeGraph(run, tr.ops, out, allowed, self._capturing), out)
        self._graphs[key] = entry
        return entry


def _route_decode_through_compiled_call(model) -> None:
    """On CPU generate() only uses get_compiled_call when the compile config allows every device."""
    cc = CompileConfig()
    cc._compile_all_devices = True
    model.generation_config.compile_config = cc


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("case", ["leftpad-long", "leftpad-short"])
def test_cuda_graph_decode_step_is_capture_safe_and_exact(model_type, case, monkeypatch):
    model = tiny_model(model_type)
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, CASES[case])
    ref = _generate(model, ids, mask, LMInfiniteConfig(n_global=3, n_local=12), 30)
    monkeypatch.setattr(lmi, "_graph_device_ok", lambda m: True)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=3, n_local=12, decode="cuda_graph"))
    runner = install_runner(model, runner=_CheckingRunner(
        model, lambda c: isinstance(c, LMInfiniteStaticCache), monkeypatch))
    _route_decode_through_compiled_call(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-5, rtol=1e-5)
    phases = 1 if case == "leftpad-long" else 2  # "full" only, or "fill" then "full"
    assert runner.stats["captures"] == phases and runner.stats["warmup"] == phases
    assert runner.stats["replays"] == 29 - phases  # 29 one-token steps: per phase one warm-up, the rest replayed
    assert out.past_key_values.get_seq_length() == ids.shape[1] + 29
    longkit.remove_patches(model)
    assert "get_compiled_call" not in vars(model)


def test_vanilla_static_cache_decode_step_is_capture_safe(monkeypatch):
    """The benchmark's vanilla baseline: HF StaticCache + the same runner, checked the same way."""
    from transformers import StaticCache

    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, [20, 14])
    gen = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    ref = model.generate(ids, **gen)
    with graphed_decode(model) as _:
        runner = install_runner(model, runner=_CheckingRunner(model, lambda c: isinstance(c, StaticCache),
                                                              monkeypatch))
        _route_decode_through_compiled_call(model)
        out = model.generate(ids, cache_implementation="static", **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-5, rtol=1e-5)
    assert runner.stats == {"eager": 0, "warmup": 1, "captures": 1, "replays": 10}
    assert "get_compiled_call" not in vars(model)


# --------------------------------------------------------------------------- options and errors
def test_decode_option_validation_and_cpu_cuda_graph_error():
    with pytest.raises(ConfigError, match="decode must be one of"):
        LMInfiniteConfig(decode="graph")
    with pytest.raises(ConfigError, match="needs bounded_cache=True"):
        LMInfiniteConfig(decode="static", bounded_cache=False)
    assert LMInfiniteConfig(decode="cuda_graph").resolved(64).decode == "cuda_graph"
    model = tiny_model("llama")
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(decode="cuda_graph"))
    assert "get_compiled_call" in vars(model)
    with pytest.raises(UnsupportedModelError, match="needs the model on a CUDA device"):
        model.generate(torch.randint(1, 96, (1, 5)), max_new_tokens=2)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(decode="static"))  # replaces: runner removed
    assert "get_compiled_call" not in vars(model)


def test_static_cache_reset_and_reuse_give_the_same_tokens():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=3, n_local=12, decode="static"))
    ids, mask = left_padded(model.config.vocab_size, [20, 13])
    cache = LMInfiniteStaticCache(model.config.num_hidden_layers, 3, 12, mask)
    gen = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    first = model.generate(ids, past_key_values=cache, **gen)
    keys = cache.layers[1].keys
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.graph_ready()
    again = model.generate(ids, past_key_values=cache, **gen)
    assert torch.equal(first, again) and cache.layers[1].keys is keys  # same buffers: graphs stay valid
