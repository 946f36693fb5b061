"""CUDA-graph replay of one-token decode forwards inside Hugging Face ``generate()``.

Why our own ``torch.cuda.CUDAGraph`` capture rather than ``torch.compile(mode="reduce-overhead")``: with
transformers 5.17-5.25 ``generate()`` already separates prefill (eager ``self(...)``) from decode steps
(``model_forward = self.get_compiled_call(...)`` when the cache ``is_compileable``, on CUDA, unless
``disable_compile=True``). We replace only that hook, per model instance, by :class:`DecodeGraphRunner`:

* no Dynamo tracing of longkit's or transformers' Python (compile of an 8B decode step takes minutes and
  recompiles for every batch size and cache length; a graph capture takes one forward);
* identical behaviour on every transformers version of the window (the hook and its call site are the same;
  only the cache's keyword changed, ``past_key_values`` -> ``cache`` in 5.24, read from :mod:`.compat`);
* the same runner serves the vanilla baseline (``StaticCache``) and LM-Infinite
  (:class:`~longkit.hf_patches.lm_infinite.static_cache.LMInfiniteStaticCache`), so a benchmark compares methods,
  not capture machinery.

Protocol: the first one-token step of a (cache, phase, input shapes) key runs eagerly on a side stream (the
warm-up the CUDA-graph docs ask for; it is a real step), the second is captured and replayed, later ones are
replayed. A cache may implement ``graph_ready()``, ``graph_phase()``, ``graph_inputs(kwargs)`` and
``graph_step_done()`` (see ``LMInfiniteStaticCache``); HF's ``StaticCache`` needs none of them (its write
index is already a device tensor and ``generate()`` hands it a fixed-shape 4-D mask).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .compat import cache_kwarg

__all__ = ["DecodeGraphRunner", "install_runner", "uninstall_runner", "graphed_decode"]

_RUNNER_ATTR = "_longkit_graph_runner"


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensor inputs (tensors or dicts of tensors) vs. everything else (must be constant for a graph)."""
    tensors, consts = {}, {}
    for k, v in kwargs.items():
        if k == cache_kwarg():  # the cache is baked into the graph, never copied
            continue
        if isinstance(v, torch.Tensor) or (isinstance(v, dict) and v and all(
                isinstance(x, torch.Tensor) or x is None for x in v.values())):
            tensors[k] = v
        else:
            consts[k] = v
    return tensors, consts


def _signature(tensors: dict[str, Any]) -> tuple:
    def sig(t: Any) -> Any:
        return None if t is None else (tuple(t.shape), t.dtype, t.device)

    return tuple((k, tuple(sorted((n, sig(x)) for n, x in v.items())) if isinstance(v, dict) else sig(v))
                 for k, v in sorted(tensors.items()))


def _clone(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: None if x is None else x.clone() for k, x in v.items()}
    return v.clone()


def _copy_into(static: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict):
            for n, x in v.items():
                if x is not None:
                    static[k][n].copy_(x)
        else:
            static[k].copy_(v)


class DecodeGraphRunner:
    """Drop-in for ``model.get_compiled_call(...)``: replays one-token forwards from CUDA graphs.

    Args:
        model: the model whose forward is captured (held weakly).
        accept: which caches to graph (default: any whose ``is_compileable`` is true); other calls, and every
            multi-token call (prefill, chunked prefill), run the model eagerly.

    ``stats`` counts eager calls, warm-up steps, captures and replays (tests and benchmarks read it).
    """

    def __init__(self, model: nn.Module, accept: Callable[[Any], bool] | None = None):
        self._model = weakref.ref(model)
        self._accept = accept or (lambda cache: bool(getattr(cache, "is_compileable", False)))
        self._graphs: dict[tuple, tuple[dict[str, Any], torch.cuda.CUDAGraph, Any]] = {}
        self._warmed: set[tuple] = set()
        self._cache_ref: weakref.ref | None = None
        self._pool: Any = None
        self.stats = {"eager": 0, "warmup": 0, "captures": 0, "replays": 0}

    def reset(self) -> None:
        """Drop every graph (and its memory pool); the next calls warm up and capture again."""
        self._graphs.clear()
        self._warmed.clear()
        self._cache_ref = None
        self._pool = None

    def _graphable(self, kwargs: dict[str, Any]) -> bool:
        cache, ids = kwargs.get(cache_kwarg()), kwargs.get("input_ids")
        return (cache is not None and isinstance(ids, torch.Tensor) and self._device_ok(ids) and ids.dim() == 2
                and ids.shape[1] == 1 and kwargs.get("inputs_embeds") is None and self._accept(cache)
                and getattr(cache, "graph_ready", lambda: True)())

    def _device_ok(self, ids: torch.Tensor) -> bool:
        return ids.is_cuda

    def __call__(self, **kwargs: Any) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this DecodeGraphRunner was garbage-collected")
        if not self._graphable(kwargs):
            self.stats["eager"] += 1
            return model(**kwargs)
        cache = kwargs[cache_kwarg()]
        if self._cache_ref is None or self._cache_ref() is not cache:
            self.reset()  # graphs bake in the cache's buffers: a new cache needs new graphs
            self._cache_ref = weakref.ref(cache)
        prepare = getattr(cache, "graph_inputs", None)
        if prepare is not None:
            kwargs = prepare(kwargs)
        tensors, consts = _split(kwargs)
        phase = getattr(cache, "graph_phase", lambda: None)()
        key = (phase, _signature(tensors), tuple(sorted((k, repr(v)) for k, v in consts.items())))
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._warmed:
                self._warmed.add(key)
                return self._warm_step(model, kwargs)
            entry = self._capture(model, cache, tensors, consts, key)
        static_in, graph, out = entry
        _copy_into(static_in, tensors)
        graph.replay()
        self.stats["replays"] += 1
        done = getattr(cache, "graph_step_done", None)
        if done is not None:
            done()
        return out

    def _warm_step(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        """A real decode step run eagerly on a side stream, so lazy library setup happens outside capture."""
        self.stats["warmup"] += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = model(**kwargs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        return out

    def _capture(self, model: nn.Module, cache: Any, tensors: dict[str, Any], consts: dict[str, Any],
                 key: tuple) -> tuple[dict[str, Any], torch.cuda.CUDAGraph, Any]:
        static_in = {k: _clone(v) for k, v in tensors.items()}
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        # Capture records kernels without running them; the replay that follows performs this step.
        with torch.cuda.graph(graph, pool=self._pool):
            out = model(**consts, **static_in, **{cache_kwarg(): cache})
        self.stats["captures"] += 1
        entry = (static_in, graph, out)
        self._graphs[key] = entry
        return entry


def install_runner(model: nn.Module, accept: Callable[[Any], bool] | None = None,
                   runner: DecodeGraphRunner | None = None) -> DecodeGraphRunner:
    """Make this model instance's ``generate()`` replay one-token steps from CUDA graphs (idempotent).

    ``runner`` replaces the default ``DecodeGraphRunner(model, accept)`` (tests pass an instrumented one).
    """
    installed = getattr(model, _RUNNER_ATTR, None)
    if installed is not None and runner is None:
        return installed
    if installed is not None:
        uninstall_runner(model)
    if runner is None:
        runner = DecodeGraphRunner(model, accept)
    chosen = runner

    def get_compiled_call(self: nn.Module, compile_config: Any = None) -> DecodeGraphRunner:
        return chosen

    model.get_compiled_call = types.MethodType(get_compiled_call, model)
    setattr(model, _RUNNER_ATTR, runner)
    return runner


def uninstall_runner(model: nn.Module) -> None:
    """Undo :func:`install_runner` (frees the graphs)."""
    runner = model.__dict__.pop(_RUNNER_ATTR, None)
    if runner is not None:
        runner.reset()
        model.__dict__.pop("get_compiled_call", None)


@contextmanager
def graphed_decode(model: nn.Module, accept: Callable[[Any], bool] | None = None) -> Iterator[DecodeGraphRunner]:
    """``with graphed_decode(model): model.generate(..., cache_implementation="static")`` for any HF model.

    Used for the vanilla baseline of ``benchmarks/lm_infinite_decode.py``: HF's own ``StaticCache`` and SDPA
    attention, one-token steps replayed from CUDA graphs by the same runner LM-Infinite uses.
    """
    runner = install_runner(model, accept)
    try:
        yield runner
    finally:
        uninstall_runner(model)
