"""Per-layer offload of the tensors autograd saves for backward, through saved-tensor hooks.

How it works, on one model instance:

* One :func:`torch.autograd.graph.saved_tensors_hooks` context is open for the duration of the **backbone's**
  forward (the module that runs the decoder layers, e.g. ``model.model``), entered by a forward pre-hook and
  left by a forward hook that runs even when the forward raises. Forward pre/post hooks on each decoder layer
  tell which layer a saved tensor belongs to. The context sits *outside* the layers so that it also sees what
  non-reentrant gradient checkpointing saves just before a checkpointed layer runs: the layer's inputs
  (inside the layer, checkpointing's own hooks take over and save nothing). A tensor saved between two layers
  is given to the next layer; one saved after the last layer (final norm) stays on the device.
* A tensor a layer saves is copied to host memory when it is at least ``min_tensor_bytes``; not a parameter,
  a view of one, a tensor sharing a parameter's storage, nor autocast's cast copy of a trainable one (a cast of
  a *frozen* parameter cannot be told from an activation and is offloaded); a plain strided tensor (not a
  broadcast ``expand`` view, not a subclass) on the compute device; and its layer is not one of the last
  ``gpu_fraction`` of layers.
  The same data saved several times (``q_proj``, ``k_proj`` and ``v_proj`` all save their input) is copied
  once. On CUDA the copy runs on a side stream into a pinned buffer taken from a pool keyed by
  ``(device, dtype, numel)``, and ``record_stream`` keeps the source's memory from reuse until it is copied.
  The layer holds its sources until it ends (to check that none was modified in place); then the compute
  stream waits for the *previous* layer's copies, which bounds how far the copies may fall behind.
* In the backward, the first use of a layer's tensors copies them back (on the side stream, the compute stream
  waits on an event only when a tensor is used) and, with ``prefetch``, starts copying the previous layer's
  (backward runs the layers in reverse). A host buffer goes back to the pool when autograd frees the last
  saved tensor using it, so buffers are allocated in the first step and reused afterwards.
* Without CUDA the same code runs with plain (unpinned) host copies and a warning: nothing is saved on memory,
  but the path is exercised (CPU tests check gradients with it).

Autograd forbids modifying a saved tensor in place (it raises in backward); with offload, such a change made
before the end of the layer that saved the tensor raises at the end of that layer instead. Not supported:
``torch.compile`` of the decoder layers (the hooks are Python), tensor subclasses (kept on the device).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import ActivationOffloadConfig
from ..errors import ConfigError
from .layers import find_decoder_layers
from .pool import HostBufferPool

__all__ = ["ActivationOffloader", "offload_activations", "install", "uninstall", "get_offloader",
           "NO_CUDA_WARNING"]

_ATTR = "_longkit_activation_offload"
NO_CUDA_WARNING = ("longkit activation offload: CUDA is not available, so offloading has no effect on memory "
                   "(saved tensors are copied to unpinned host buffers and back, on the CPU); this path runs so "
                   "that CPU tests can check gradients")


# Single-input layout/cast nodes: a tensor reached from a parameter through these alone is that parameter (e.g.
# autocast's cached bf16 copy of a weight, then transposed by linear).
_WEIGHT_PATH = frozenset({"ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0",
                          "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0"})


def _derived_from_parameter(t: torch.Tensor) -> bool:
    node = t.grad_fn
    for _ in range(4):
        if node is None:
            return False
        if type(node).__name__ == "AccumulateGrad":
            return isinstance(node.variable, nn.Parameter)
        if node.name() not in _WEIGHT_PATH or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False


def _dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a strided layout covers exactly ``numel`` consecutive elements (a permutation of contiguous)."""
    expect = 1
    for st, n in sorted((st, n) for n, st in zip(shape, stride) if n != 1):
        if st != expect:
            return False
        expect *= n
    return True


class _Record:
    """One tensor copied to the host; every saved reference to the same data shares it."""

    __slots__ = ("shape", "stride", "dtype", "device", "nbytes", "pool_key", "buf", "host", "version", "source",
                 "event", "device_copy", "h2d_event", "refs", "pool")

    def release(self) -> None:
        if self.buf is not None:
            self.pool.release(self.pool_key, self.buf)
        self.buf = self.host = self.device_copy = self.h2d_event = self.event = self.source = None


class _Group:
    """The tensors one decoder layer saved in one forward (``layer`` is ``None`` until a layer claims them)."""

    __slots__ = ("layer", "keep", "records", "pending", "prev", "loaded", "event", "device")

    def __init__(self, prev: _Group | None):
        self.layer: int | None = None
        self.keep = True  # a group no layer claims (after the last layer) stays on the device
        self.records: dict[int, _Record] = {}
        self.pending: list[_Saved] = []
        self.prev = prev
        self.loaded = False
        self.event: Any = None  # the last device-to-host copy of this group (CUDA) and its device
        self.device: torch.device | None = None


class _Saved:
    """What the pack hook returns: the tensor itself (kept on the device) or its host record."""

    __slots__ = ("tensor", "record", "group")

    def __init__(self, tensor: torch.Tensor | None, record: _Record | None, group: _Group):
        self.tensor, self.record, self.group = tensor, record, group

    def __del__(self) -> None:  # autograd freed this saved tensor
        rec = self.record
        if rec is not None:
            rec.refs -= 1
            if rec.refs == 0:
                rec.release()


class ActivationOffloader:
    """Offloads the tensors a model's decoder layers save for backward to host memory (see the module doc).

    Installs itself on ``model`` when built; :meth:`remove` (or leaving the ``with`` block) undoes it.

    Args:
        model: a Hugging Face model (the decoder layers are found as in
            :func:`~longkit.offload.find_decoder_layers`) or any ``nn.Module`` together with ``layers``.
        config: :class:`~longkit.config.ActivationOffloadConfig` (default: its defaults).
        layers: the ``nn.ModuleList`` of decoder layers, if the search cannot tell.

    Examples::

        >>> with ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=1 << 20)) as off:  # doctest: +SKIP
        ...     model(**batch).loss.backward()
        ...     print(off.stats()["bytes_offloaded_last_forward"])
    """

    def __init__(self, model: nn.Module, config: ActivationOffloadConfig | None = None, *, layers: Any = None):
        config = ActivationOffloadConfig() if config is None else config
        if not isinstance(config, ActivationOffloadConfig):
            raise ConfigError(f"config must be an ActivationOffloadConfig, got {type(config).__name__}; build it "
                              "with ActivationOffloadConfig(min_tensor_bytes=..., gpu_fraction=...)")
        if not config.enabled:
            raise ConfigError("ActivationOffloadConfig(enabled=False) asks for no offload: do not install it")
        if getattr(model, _ATTR, None) is not None:
            raise ConfigError("activation offload is already installed on this model; remove it first "
                              "(longkit.offload.get_offloader(model).remove())")
        self.config = config
        self.backbone, self.layers, self.layers_path = find_decoder_layers(model, layers)
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            warnings.warn(NO_CUDA_WARNING, UserWarning, stacklevel=2)
        self.device_type = "cuda" if self.cuda else "cpu"
        self.pool = HostBufferPool(pin_memory=self.cuda and config.pin_memory)
        n = len(self.layers)
        self.kept_layers = frozenset(range(n - config.kept_layers(n), n))
        self._layer_params = [list(layer.parameters()) for layer in self.layers]
        self._all_params = list(model.parameters())
        self._streams: dict[int, Any] = {}
        self._ctx: Any = None
        self._current: _Group | None = None
        self._last: _Group | None = None
        self._dedupe: dict[tuple, tuple[weakref.ref, _Record]] = {}
        self._warned_device = self._other_device = False
        self._depth = 0
        self._totals = {"forwards": 0, "bytes_offloaded_total": 0, "bytes_reloaded_total": 0,
                        "bytes_prefetched_total": 0}
        self._fwd: dict[str, Any] = {}
        self._model = weakref.ref(model)
        hooks = [self.backbone.register_forward_pre_hook(self._backbone_pre),
                 self.backbone.register_forward_hook(self._backbone_post, always_call=True)]
        for i, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(self._layer_pre_hook(i)))
            hooks.append(layer.register_forward_hook(self._layer_post_hook(i), always_call=True))
        self._hooks = hooks
        setattr(model, _ATTR, self)

    # ------------------------------------------------------------------------------------------ public
    def stats(self) -> dict[str, Any]:
        """Counters: the last backbone forward (one training step without gradient accumulation), totals, pool.

        ``bytes_offloaded_last_forward`` / ``tensors_offloaded_last_forward``: copied to the host (each piece of
        data once); ``bytes_kept_last_forward``: tensors big enough to offload that stayed on the device (kept
        layers and after the last layer; parameters excluded; counted per save, shared data several times);
        ``bytes_offloaded_by_layer`` (layer index -> bytes, last forward); totals over all
        forwards (``bytes_reloaded_total`` includes ``bytes_prefetched_total``); and the host pool:
        ``pool_buffers``, ``pool_bytes``, ``peak_pool_bytes``, ``buffers_allocated`` (ever), ``pinned``.
        """
        fwd = self._fwd
        return {"device": self.device_type, "layers": len(self.layers), "layers_on_device": len(self.kept_layers),
                "bytes_offloaded_last_forward": fwd.get("bytes_offloaded", 0),
                "tensors_offloaded_last_forward": fwd.get("tensors_offloaded", 0),
                "bytes_kept_last_forward": fwd.get("bytes_kept", 0),
                "bytes_offloaded_by_layer": dict(fwd.get("bytes_offloaded_by_layer", {})),
                **self._totals, **self.pool.stats()}

    def remove(self) -> None:
        """Remove the hooks from the model (idempotent). Saved tensors of a graph not yet backpropagated stay
        valid; idle host buffers are freed."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        model = self._model()
        if model is not None and getattr(model, _ATTR, None) is self:
            delattr(model, _ATTR)
        self.pool.clear()

    def __enter__(self) -> ActivationOffloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------------------------------ forward hooks
    def _backbone_pre(self, module: nn.Module, args: tuple) -> None:
        if self._ctx is not None:  # the backbone called inside itself: the outer call is in charge
            self._depth += 1
            return
        if not torch.is_grad_enabled():
            return  # nothing will be saved
        self._fwd = {"bytes_offloaded": 0, "tensors_offloaded": 0, "bytes_kept": 0, "bytes_offloaded_by_layer": {}}
        self._totals["forwards"] += 1
        self._dedupe = {}
        self._last = None
        self._current = _Group(prev=None)
        ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        ctx.__enter__()
        self._ctx = ctx

    def _backbone_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._depth:
            self._depth -= 1
            return
        if self._ctx is None:
            return
        ctx, self._ctx = self._ctx, None
        try:
            group = self._current
            if group is not None and group.layer is not None:  # the forward raised inside a layer
                self._close(group)
            elif group is not None:  # saved after the last layer (final norm): stays on the device; its first
                group.prev = self._last  # use in backward prefetches the last layer
                self._fwd["bytes_kept"] += sum(saved.tensor.nbytes for saved in group.pending)
                group.pending = []  # (the handles point at the group: no cycle may outlive the forward)
        finally:
            ctx.__exit__(None, None, None)
            self._current = self._last = None
            self._dedupe = {}
        if self._other_device and not self._warned_device:
            self._warned_device = True
            warnings.warn(f"longkit activation offload: saved tensors on a device other than {self.device_type} "
                          "were not offloaded (move the model to the GPU before training)", UserWarning, stacklevel=2)

    def _layer_pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._ctx is None:
                return  # backward recompute of a checkpointed layer, or a forward without grad
            group = self._current
            if group is None or group.layer is not None:  # a layer called inside another: a group of its own
                group = _Group(prev=self._last)
            group.layer, group.keep, group.prev = index, index in self.kept_layers, self._last
            pending, group.pending = group.pending, []
            for saved in pending:  # saved before the layer ran (checkpointed inputs): now they are the layer's
                if not group.keep:
                    saved.record = self._offload(saved.tensor, group)
                    saved.tensor = None
                else:
                    self._fwd["bytes_kept"] += saved.tensor.nbytes
            self._current = group
        return hook

    def _layer_post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            group = self._current
            if self._ctx is None or group is None or group.layer != index:
                return
            self._close(group)
            self._last = group
            self._current = _Group(prev=group)
        return hook

    def _close(self, group: _Group) -> None:
        """End of a layer's forward: check that nothing it saved was modified in place; throttle the copies."""
        for rec in group.records.values():
            src, rec.source = rec.source, None
            if src is not None and src._version != rec.version:
                raise RuntimeError(f"a tensor of shape {list(rec.shape)} saved for backward by decoder layer "
                                   f"{group.layer} was modified by an inplace operation after it was saved "
                                   "(autograd forbids this; with activation offload it is caught here)")
        prev = self._last
        if prev is not None and prev.event is not None:
            torch.cuda.current_stream(prev.device).wait_event(prev.event)

    # ------------------------------------------------------------------------------------------ saved-tensor hooks
    def _is_parameter(self, t: torch.Tensor, group: _Group) -> bool:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) or (t.is_leaf and t.requires_grad):
            return True
        if _derived_from_parameter(t):
            return True
        params = self._layer_params[group.layer] if group.layer is not None else self._all_params
        ptr = t.untyped_storage().data_ptr()
        return any(p.untyped_storage().data_ptr() == ptr for p in params if p.numel())

    def _pack(self, t: torch.Tensor) -> Any:
        group = self._current
        nbytes = t.numel() * t.element_size()
        if (group is None or type(t) is not torch.Tensor or t.layout != torch.strided or nbytes == 0
                or nbytes < self.config.min_tensor_bytes or any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride()))):
            return t.detach()
        if t.device.type != self.device_type:
            self._other_device = True
            return t.detach()
        if self._is_parameter(t, group):
            return t.detach()
        if group.layer is None:  # before a layer: wait and see whether one claims it
            saved = _Saved(t.detach(), None, group)
            group.pending.append(saved)
            return saved
        if group.keep:
            self._fwd["bytes_kept"] += nbytes
            return _Saved(t.detach(), None, group)
        return _Saved(None, self._offload(t, group), group)

    def _offload(self, t: torch.Tensor, group: _Group) -> _Record:
        """The host record of ``t`` (an existing one when the same data was already copied in this forward)."""
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        hit = self._dedupe.get(key)
        if hit is not None and hit[0]() is storage and hit[1].buf is not None:
            rec = hit[1]
        else:
            rec = self._copy_out(t, group)
            self._dedupe[key] = (weakref.ref(storage), rec)
        group.records[id(rec)] = rec
        rec.refs += 1
        return rec

    def _stream(self, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream

    def _copy_out(self, t: torch.Tensor, group: _Group) -> _Record:
        rec = _Record()
        rec.shape, rec.stride, rec.dtype, rec.device = tuple(t.shape), t.stride(), t.dtype, t.device
        rec.nbytes, rec.version, rec.refs, rec.pool = t.numel() * t.element_size(), t._version, 0, self.pool
        rec.source = t.detach()  # until the layer ends: shares t's version counter, for the in-place check
        rec.device_copy = rec.h2d_event = rec.event = None
        if not _dense(rec.shape, rec.stride):
            rec.stride = None  # a view with gaps: copied (and brought back) contiguous
        rec.pool_key, rec.buf = self.pool.acquire(str(t.device), t.dtype, t.numel())
        rec.host = rec.buf.view(rec.shape) if rec.stride is None else rec.buf.as_strided(rec.shape, rec.stride)
        if self.cuda:
            main, stream = torch.cuda.current_stream(t.device), self._stream(t.device)
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                rec.host.copy_(t, non_blocking=True)
            t.record_stream(stream)
            rec.event = group.event = stream.record_event()
            group.device = t.device
        else:
            rec.host.copy_(t)
        self._fwd["bytes_offloaded"] += rec.nbytes
        self._fwd["tensors_offloaded"] += 1
        by_layer = self._fwd["bytes_offloaded_by_layer"]
        by_layer[group.layer] = by_layer.get(group.layer, 0) + rec.nbytes
        self._totals["bytes_offloaded_total"] += rec.nbytes
        return rec

    def _load(self, rec: _Record, prefetch: bool = False) -> None:
        """Start copying ``rec`` back to its device (no-op if already there or released)."""
        if rec.device_copy is not None or rec.host is None:
            return
        if rec.stride is None:
            out = torch.empty(rec.shape, dtype=rec.dtype, device=rec.device)
        else:
            out = torch.empty_strided(rec.shape, rec.stride, dtype=rec.dtype, device=rec.device)
        if self.cuda:
            main, stream = torch.cuda.current_stream(rec.device), self._stream(rec.device)
            stream.wait_stream(main)  # `out` may reuse memory the compute stream has just freed
            with torch.cuda.stream(stream):
                out.copy_(rec.host, non_blocking=True)
            out.record_stream(stream)
            rec.h2d_event = stream.record_event()
        else:
            out.copy_(rec.host)
        rec.device_copy = out
        self._totals["bytes_reloaded_total"] += rec.nbytes
        if prefetch:
            self._totals["bytes_prefetched_total"] += rec.nbytes

    def _unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        group = saved.group
        if not group.loaded:  # the backward has reached this layer
            group.loaded = True
            if self.config.prefetch:
                for rec in group.records.values():
                    self._load(rec)
                prev = group.prev
                if prev is not None and not prev.loaded:
                    prev.loaded = True
                    for rec in prev.records.values():
                        self._load(rec, prefetch=True)
        rec = saved.record
        if rec is None:
            return saved.tensor
        self._load(rec)
        if rec.device_copy is None:
            raise RuntimeError("an offloaded saved tensor was used after it was freed (backward through the same "
                               "graph twice needs retain_graph=True)")
        if rec.h2d_event is not None:
            torch.cuda.current_stream(rec.device).wait_event(rec.h2d_event)
        return rec.device_copy


# ------------------------------------------------------------------------------------------ functional API
def get_offloader(model: nn.Module) -> ActivationOffloader | None:
    """The :class:`ActivationOffloader` installed on ``model``, or ``None``."""
    return getattr(model, _ATTR, None)


def install(model: nn.Module, cfg: ActivationOffloadConfig) -> dict[str, Any]:
    """``apply_patches`` protocol: install offload on this model instance; ``undo["touched"]`` = layers hooked."""
    offloader = ActivationOffloader(model, cfg)
    return {"offloader": offloader, "touched": len(offloader.layers)}


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install`."""
    undo["offloader"].remove()


@contextmanager
def offload_activations(model: nn.Module, config: ActivationOffloadConfig | None = None, *, layers: Any = None,
                        **options: Any) -> Iterator[ActivationOffloader]:
    """``with offload_activations(model, gpu_fraction=0.25) as off: ...``: offload inside the block only.

    ``options`` are :class:`~longkit.config.ActivationOffloadConfig` fields (give either them or ``config``).
    """
    if config is not None and options:
        raise ConfigError("pass either config=ActivationOffloadConfig(...) or its options as keywords, not both")
    offloader = ActivationOffloader(model, config if config is not None else ActivationOffloadConfig(**options),
                                    layers=layers)
    try:
        yield offloader
    finally:
        offloader.remove()
