"""Technique options: small frozen dataclasses validated on construction.

Rule: options shared by several hosts live here; each host package only parses its own section into them (the
DeepSpeed ``"longkit"`` section in ``longkit/deepspeed_ext/config.py``, vLLM arguments in
``longkit/vllm_plugins/<feature>/config.py``, ``apply_patches`` keywords in ``longkit/hf_patches``), so one name
means one thing everywhere. Options only one host has stay in that host's config module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ._validate import check_bool, check_choice, check_int, check_kv_codebook, check_number
from .errors import ConfigError

__all__ = ["LMInfiniteConfig", "RopeConfig", "PrefixSharingConfig", "ActivationOffloadConfig", "TiledLossConfig",
           "ROPE_TYPES", "GIRAFFE_ROPE_TYPES", "GIRAFFE_PARAMETER_KEYS", "check_giraffe_rope_parameters",
           "check_activation_offload"]

_DECODE_MODES = ("eager", "static", "cuda_graph")


@dataclass(frozen=True)
class LMInfiniteConfig:
    """LM-Infinite (Han et al., NAACL 2024): Λ-shaped attention plus a distance limit.

    Each query attends to the first ``n_global`` tokens and to the nearest ``n_local`` tokens; any
    relative distance larger than ``limit_distance`` is clamped to it, so no rotation unseen in
    pretraining ever appears.

    Args:
        n_global: number of leading ("sink") tokens every query may see. Paper: 10-100.
        n_local: size of the local causal window, in tokens. ``None`` = the model's
            ``max_position_embeddings`` (the pretraining length), as in the paper.
        limit_distance: clamped relative distance used for global-branch keys outside the window.
            ``None`` = ``n_local``.
        bounded_cache: make ``generate()`` keep only ``n_global + n_local`` tokens per layer (constant
            memory and time per decoded token). ``False`` keeps HF's full cache (same outputs).
        query_chunk: queries processed per step by the CPU/PyTorch path (memory vs. speed).
        decode: how ``generate()`` decodes with the bounded cache (same outputs in every mode):

            * ``"eager"``: the ring cache returns data-dependent shapes; no CUDA graphs.
            * ``"static"``: a preallocated ``n_global + n_local``-slot cache whose write index, token
              positions and validity live on the device, and a one-query attention step with fixed shapes
              and no host synchronisation (runs anywhere; the building block of ``"cuda_graph"``).
            * ``"cuda_graph"``: ``"static"`` plus CUDA-graph replay of every one-token decode forward
              (CUDA only; removes the per-step host overhead that bounds HF eager decoding). Prefill stays eager.
    """

    n_global: int = 10
    n_local: int | None = None
    limit_distance: int | None = None
    bounded_cache: bool = True
    query_chunk: int = 1024
    decode: str = "eager"

    def __post_init__(self) -> None:
        # Normalised values are stored back (numpy ints -> int) so equal configs compare and hash equal.
        owner = type(self).__name__
        ints = {
            "n_global": check_int(owner, "n_global", self.n_global, min=0),
            "n_local": check_int(owner, "n_local", self.n_local, min=1, allow_none=True),
            "limit_distance": check_int(owner, "limit_distance", self.limit_distance, min=1, allow_none=True),
            "query_chunk": check_int(owner, "query_chunk", self.query_chunk, min=1),
        }
        for name, value in ints.items():
            object.__setattr__(self, name, value)
        check_bool(owner, "bounded_cache", self.bounded_cache)
        check_choice(owner, "decode", self.decode, _DECODE_MODES)
        if self.decode != "eager" and not self.bounded_cache:
            raise ConfigError(
                f"LMInfiniteConfig.decode={self.decode!r} needs bounded_cache=True (it is a mode of the bounded cache)"
            )

    def resolved(self, max_position_embeddings: int) -> LMInfiniteConfig:
        """Fill the ``None`` defaults from the model's pretraining length."""
        n_local = self.n_local
        if n_local is None:  # only then is the model's length needed (some configs leave it None)
            n_local = check_int("LMInfiniteConfig.resolved", "max_position_embeddings", max_position_embeddings, min=1)
        limit = self.limit_distance if self.limit_distance is not None else n_local
        return replace(self, n_local=n_local, limit_distance=limit)


# --------------------------------------------------------------------------- RoPE types
# Giraffe's (Pal et al., arXiv 2308.10882) frequency bases, registered into transformers' rope-init table by
# ``longkit.hf_patches.rope``; ``linear`` and ``yarn`` are transformers' own and pass through unchanged.
GIRAFFE_ROPE_TYPES = ("giraffe_power", "giraffe_truncated")
ROPE_TYPES = ("linear", "yarn", *GIRAFFE_ROPE_TYPES)
GIRAFFE_POWER_DEFAULT = 0.5  # the Giraffe release's best-performing power basis ("power = 0.5")

# The keys each type's ``rope_parameters`` must hold / may hold (besides rope_type, rope_theta and
# partial_rotary_factor, which every type has).
GIRAFFE_PARAMETER_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "giraffe_power": (frozenset({"power"}), frozenset({"factor"})),
    "giraffe_truncated": (frozenset({"a", "b", "rho"}), frozenset({"factor"})),
}
# RopeConfig fields each type uses (rope_type aside); any other field must stay None.
_FIELDS_OF: dict[str, frozenset[str]] = {
    "linear": frozenset({"factor"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow"}),
    "giraffe_power": frozenset({"factor", "power"}),
    "giraffe_truncated": frozenset({"factor", "a", "b", "rho", "original_max_position_embeddings"}),
}


def _a_above_b(owner: str, a: float, b: float) -> str:
    return (f"{owner}: giraffe_truncated needs a <= b (a: the frequency at or below which rotation stops, b: the one "
            f"from which frequencies are kept), got a={a}, b={b}")


def check_giraffe_rope_parameters(owner: str, rope_type: str, params: Mapping[str, Any]) -> dict[str, float]:
    """The Giraffe parameters of one ``rope_parameters`` dict as floats (``factor`` defaults to 1.0).

    Used by :class:`RopeConfig` and by the transformers validation hook and init functions, so a value is
    accepted or refused the same way everywhere. Raises :class:`ConfigError` naming the key and the fix.
    """
    if rope_type not in GIRAFFE_PARAMETER_KEYS:
        raise ConfigError(f"{owner}: rope_type must be one of {list(GIRAFFE_ROPE_TYPES)}, got {rope_type!r}")
    required, _ = GIRAFFE_PARAMETER_KEYS[rope_type]
    missing = sorted(required - set(params))
    if missing:
        raise ConfigError(f"{owner}: rope_type {rope_type!r} needs the key(s) {missing} in rope_parameters, got "
                          f"{sorted(params)}; e.g. longkit.RopeConfig(rope_type={rope_type!r}) fills defaults")
    out = {"factor": check_number(owner, "factor", 1.0 if params.get("factor") is None else params["factor"],
                                  min=1.0)}
    if rope_type == "giraffe_power":
        out["power"] = check_number(owner, "power", params["power"], min=0.0)
        return out
    a = check_number(owner, "a", params["a"], min=0.0)
    b = check_number(owner, "b", params["b"], min=0.0)
    rho = check_number(owner, "rho", params["rho"], min=0.0)
    if a > b:
        raise ConfigError(_a_above_b(owner, a, b))
    out.update(a=a, b=b, rho=rho)
    return out


@dataclass(frozen=True)
class RopeConfig:
    """A RoPE frequency basis for ``apply_patches(model, rope=...)``: Giraffe's or transformers' linear/yarn.

    With head dim ``d``, base ``θ`` and pair index ``i = 0 .. d/2-1``, the standard frequencies are
    ``f_i = θ^(-2i/d)``; every type first divides them by ``factor`` (linear scaling, 1 = none), then:

    * ``"giraffe_power"`` (power basis): ``f_i' = f_i · (1 - 2i/d)^power``. ``power=0`` is the plain basis; the
      lower the frequency, the more it is shrunk. Default ``power=0.5`` (the Giraffe release's best power).
    * ``"giraffe_truncated"`` (truncated basis): ``f_i' = f_i`` if ``f_i >= b``; ``rho`` if ``a < f_i < b``;
      ``0`` (no rotation) if ``f_i <= a``. Defaults from the pretraining length ``L``
      (``original_max_position_embeddings``, ``None`` = the model's ``max_position_embeddings``): ``b = 2π/L``
      (keep the frequencies that complete a full turn within ``L``), ``a = b/8`` and ``rho = b/16`` (the
      ratios of the Giraffe release: ``rho``'s wavelength is 16 L, so positions stay distinguishable to 16 L).
      ``a = b = 0`` is the plain basis.
    * ``"linear"``: transformers' position interpolation (``factor`` required).
    * ``"yarn"``: transformers' YaRN (``factor`` required; ``original_max_position_embeddings`` ``None`` = the
      model's ``max_position_embeddings``; ``attention_factor``, ``beta_fast``, ``beta_slow`` optional).

    Options a type does not use must stay ``None``.
    """

    rope_type: str = "giraffe_power"
    factor: float | None = None
    power: float | None = None
    a: float | None = None
    b: float | None = None
    rho: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "rope_type", self.rope_type, ROPE_TYPES)
        used = _FIELDS_OF[self.rope_type]
        for f in fields(self):
            if f.name != "rope_type" and f.name not in used and getattr(self, f.name) is not None:
                raise ConfigError(f"{owner}.{f.name} is not an option of rope_type={self.rope_type!r} (it takes "
                                  f"{sorted(used)}); leave it None")
        if self.rope_type in ("linear", "yarn") and self.factor is None:
            raise ConfigError(f"{owner}: rope_type={self.rope_type!r} needs a factor (the context extension ratio, "
                              f"e.g. factor=4.0)")
        normalised: dict[str, Any] = {
            "original_max_position_embeddings": check_int(owner, "original_max_position_embeddings",
                                                          self.original_max_position_embeddings, min=1,
                                                          allow_none=True),
        }
        if self.factor is not None:
            normalised["factor"] = check_number(owner, "factor", self.factor, min=1.0)
        for name in ("attention_factor", "beta_fast", "beta_slow"):
            if getattr(self, name) is not None:
                normalised[name] = check_number(owner, name, getattr(self, name), min=0.0, min_exclusive=True)
        if self.rope_type == "giraffe_power":
            normalised["power"] = check_number(owner, "power", GIRAFFE_POWER_DEFAULT if self.power is None
                                               else self.power, min=0.0)
        if self.rope_type == "giraffe_truncated":
            for name in ("a", "b", "rho"):
                if getattr(self, name) is not None:
                    normalised[name] = check_number(owner, name, getattr(self, name), min=0.0)
            if self.a is not None and self.b is not None and normalised["a"] > normalised["b"]:
                raise ConfigError(_a_above_b(owner, normalised["a"], normalised["b"]))
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def rope_parameters(self, max_position_embeddings: int | None = None) -> dict[str, Any]:
        """The ``config.rope_parameters`` entries of this type (without ``rope_theta``), defaults resolved.

        ``max_position_embeddings`` (the model's) resolves ``original_max_position_embeddings=None``; only
        yarn and giraffe_truncated defaults need it.
        """
        owner = type(self).__name__
        out: dict[str, Any] = {"rope_type": self.rope_type}
        if self.factor is not None:
            out["factor"] = self.factor
        needs_length = self.rope_type == "yarn" or (
            self.rope_type == "giraffe_truncated" and None in (self.a, self.b, self.rho))
        length = self.original_max_position_embeddings
        if needs_length and length is None:
            length = check_int(owner, "max_position_embeddings", max_position_embeddings, min=1,
                               want="the model's max_position_embeddings (an int >= 1); set "
                                    "RopeConfig.original_max_position_embeddings instead")
        if self.rope_type == "yarn":
            out["original_max_position_embeddings"] = length
            for name in ("attention_factor", "beta_fast", "beta_slow"):
                if getattr(self, name) is not None:
                    out[name] = getattr(self, name)
        elif self.rope_type == "giraffe_power":
            out["power"] = self.power
        elif self.rope_type == "giraffe_truncated":
            b = self.b if self.b is not None else 2 * math.pi / length
            out.update(a=self.a if self.a is not None else b / 8, b=b, rho=self.rho if self.rho is not None else b / 16)
            check_giraffe_rope_parameters(owner, self.rope_type, out)  # e.g. an explicit a above the default b
        return out


_ATTENTION_IMPLS = (None, "auto", "naive", "triton")


@dataclass(frozen=True)
class PrefixSharingConfig:
    """How a patched backbone finds rows that share a prefix and computes each shared prefix once.

    Args:
        min_shared_tokens: rows are grouped only when they share at least this many (non-padding) leading
            tokens; shorter common prefixes (e.g. only a chat template's system prompt) are not worth a branch.
        pack: ``True`` (default): every group of one forward goes into one packed row (documents, no padding
            at all); ``False``: one row per group, padded to the longest group.
        attention_impl: passed to :func:`longkit.kernels.masked_attention` as ``impl`` (``None`` = the Triton
            kernel on CUDA, the PyTorch reference elsewhere).
    """

    min_shared_tokens: int = 16
    pack: bool = True
    attention_impl: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "min_shared_tokens",
                           check_int(owner, "min_shared_tokens", self.min_shared_tokens, min=1))
        check_bool(owner, "pack", self.pack)
        check_choice(owner, "attention_impl", self.attention_impl, _ATTENTION_IMPLS)


# --------------------------------------------------------------------------- activation offload
_OFFLOAD_DEFAULTS: dict[str, Any] = {"enabled": True, "min_tensor_bytes": 1 << 20, "gpu_fraction": 0.0,
                                     "prefetch": True, "pin_memory": True}


def check_activation_offload(owner: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`ActivationOffloadConfig` options in ``values``, checked and normalised (missing keys get the
    defaults). ``owner`` names them in messages (``"ActivationOffloadConfig"`` or the JSON key path
    ``"longkit.activation_offload"``), so each entry point reports the name its user wrote."""
    v = {**_OFFLOAD_DEFAULTS, **values}
    return {
        "enabled": check_bool(owner, "enabled", v["enabled"], want="true or false"),
        "min_tensor_bytes": check_int(owner, "min_tensor_bytes", v["min_tensor_bytes"], min=0,
                                      want="an int >= 0 (bytes; e.g. 1048576 for 1 MiB)"),
        "gpu_fraction": check_number(owner, "gpu_fraction", v["gpu_fraction"], min=0.0, max=1.0),
        "prefetch": check_bool(owner, "prefetch", v["prefetch"], want="true or false"),
        "pin_memory": check_bool(owner, "pin_memory", v["pin_memory"], want="true or false"),
    }


@dataclass(frozen=True)
class ActivationOffloadConfig:
    """Per-layer offload of the tensors autograd saves for backward (see :mod:`longkit.offload`).

    Every tensor a decoder layer saves for backward (with gradient checkpointing: the layer's checkpointed input)
    is copied to host memory during the forward, on a side CUDA stream into pinned buffers reused across steps,
    and copied back during the backward, one layer ahead of its use.

    Args:
        enabled: install the offload (``False`` only makes sense in a DeepSpeed ``"longkit"`` section, to keep
            the section while turning it off; without the section it is off).
        min_tensor_bytes: tensors smaller than this stay on the device (their copies cost more than they save).
            Default 1 MiB.
        gpu_fraction: fraction of the decoder layers whose saved tensors stay on the device, taken from the
            *last* layers (the ones backward needs first, whose copies could not be hidden behind compute):
            ``round(gpu_fraction * num_layers)`` layers, rounded half up. ``0`` offloads every layer, ``1`` none.
        prefetch: when the backward reaches layer ``i``, start copying layer ``i - 1``'s tensors back (so the
            copy overlaps layer ``i``'s backward); ``False`` copies each tensor when it is needed.
        pin_memory: page-locked host buffers (needed for asynchronous copies). Ignored without CUDA: nothing is
            pinned then.

    Parameters and tensors that share storage with a parameter are never offloaded.
    """

    enabled: bool = True
    min_tensor_bytes: int = 1 << 20
    gpu_fraction: float = 0.0
    prefetch: bool = True
    pin_memory: bool = True

    def __post_init__(self) -> None:
        values = check_activation_offload(type(self).__name__, {f.name: getattr(self, f.name) for f in fields(self)})
        for name, value in values.items():  # normalised (numpy ints -> int, 0 -> 0.0) so equal configs compare equal
            object.__setattr__(self, name, value)

    def kept_layers(self, num_layers: int) -> int:
        """How many of ``num_layers`` decoder layers keep their saved tensors on the device (the last ones)."""
        n = check_int(type(self).__name__, "num_layers", num_layers, min=0)
        return min(n, math.floor(self.gpu_fraction * n + 0.5))


# --------------------------------------------------------------------------- tiled loss
@dataclass(frozen=True)
class TiledLossConfig:
    """Compute a causal LM's training loss with :func:`longkit.kernels.tiled_ce.tiled_cross_entropy`.

    A forward with ``labels`` runs the backbone, then the LM head and cross-entropy ``chunk_size`` tokens at a time, so
    the ``[tokens, vocab]`` logits never exist; it returns the loss and **no logits** (``logits=None``). A forward
    without ``labels`` (generation, evaluation that needs logits) is the model's own.

    Args:
        chunk_size: tokens per tile. The tiles take about ``chunk_size × vocab × 6`` bytes for a bf16/fp16 model
            (``× 4`` for fp32): 3.2 GB at 4096 × 128256. Smaller saves memory, larger runs fewer, bigger GEMMs.
    """

    chunk_size: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk_size", check_int(type(self).__name__, "chunk_size", self.chunk_size, min=1))


# --------------------------------------------------------------------------- tiled MLP
@dataclass(frozen=True)
class TiledMLPConfig:
    """Run every decoder layer's MLP ``chunk_size`` tokens at a time, recomputing each tile in backward.

    The MLP's intermediates (``4 × intermediate_size`` values per token for a Llama MLP: 115 KB per token at
    Llama-3-8B's 14336 in bf16) then exist for one tile at a time; autograd keeps only the MLP's input. Costs one
    more MLP forward per training step (the backward recomputes each tile).

    Args:
        chunk_size: tokens per tile. Smaller saves memory, larger runs fewer, bigger GEMMs.
    """

    chunk_size: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk_size", check_int(type(self).__name__, "chunk_size", self.chunk_size, min=1))


# --------------------------------------------------------------------------- memory blocks (InfLLM-style)
@dataclass(frozen=True)
class MemoryConfig:
    """Memory blocks of the tokens LM-Infinite leaves out of view (InfLLM: Xiao et al., arXiv 2402.04617).

    Used as ``apply_patches(model, lm_infinite=..., memory=MemoryConfig(...))``: LM-Infinite's sinks and local
    window stay as they are; the middle tokens (past the sinks, out of the window) are grouped into blocks of
    ``block_size`` positions, each block keeps ``repr_keys`` representative keys, and every chunk of queries also
    attends to the ``topk`` blocks whose representatives score highest against the chunk's mean query. Every
    retrieved block is seen at the same place, ``distance`` before the query (its token ``o`` at ``distance - o``,
    so its inner order is kept), as LM-Infinite sees its sinks at ``limit_distance``: no distance unseen in
    pretraining appears. See ``docs/inf_memory.md``.

    Args:
        block_size: positions per memory block. LM-Infinite's ``n_local`` must be at least twice this.
        repr_keys: representative keys per block (``1 .. block_size``): the tokens that receive the most
            attention from the ``block_size`` queries that follow them (a softmax over those queries' last
            ``block_size`` keys). ``repr_keys == block_size`` scores blocks by every key (exact, slower).
        topk: blocks retrieved per query chunk and KV head. ``0`` = no retrieval (exactly LM-Infinite).
        chunk_size: queries per retrieval chunk in a multi-token forward (prefill), counted back from its last
            token; a one-token decode step is its own chunk.
        distance: relative distance at which a retrieved block's first token is seen (its token ``o`` at
            ``distance - o``). ``None`` = LM-Infinite's ``limit_distance`` (by default its ``n_local``, as InfLLM).
            Between ``block_size`` and the pretraining length.
        reselect_every: decoding re-selects the blocks every this many steps (``1`` = every step); until the first
            re-selection after a prompt, decode steps use the blocks the prompt's last chunk selected.
        offload: keep the blocks' keys and values in (pinned) host memory with a cache of recently used blocks on
            the device, so device memory stays bounded whatever the input length. Costs one device-to-host read of
            the selected block ids per layer and selection. On a CPU model both live in host memory (same outputs,
            nothing saved).
        gpu_blocks: with ``offload``, device cache size in blocks per layer (each block holds every batch row and
            KV head). ``None`` = ``batch × kv_heads × topk``, the most one selection can use.
    """

    block_size: int = 128
    repr_keys: int = 4
    topk: int = 16
    chunk_size: int = 512
    distance: int | None = None
    reselect_every: int = 1
    offload: bool = False
    gpu_blocks: int | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        ints = {
            "block_size": check_int(owner, "block_size", self.block_size, min=1),
            "repr_keys": check_int(owner, "repr_keys", self.repr_keys, min=1),
            "topk": check_int(owner, "topk", self.topk, min=0),
            "chunk_size": check_int(owner, "chunk_size", self.chunk_size, min=1),
            "distance": check_int(owner, "distance", self.distance, min=1, allow_none=True),
            "reselect_every": check_int(owner, "reselect_every", self.reselect_every, min=1),
            "gpu_blocks": check_int(owner, "gpu_blocks", self.gpu_blocks, min=1, allow_none=True),
        }
        for name, value in ints.items():
            object.__setattr__(self, name, value)
        check_bool(owner, "offload", self.offload)
        if self.repr_keys > self.block_size:
            raise ConfigError(f"{owner}.repr_keys={self.repr_keys} exceeds block_size={self.block_size}; a block has "
                              f"only block_size keys to choose from (repr_keys == block_size scores by every key)")
        if self.gpu_blocks is not None and not self.offload:
            raise ConfigError(f"{owner}.gpu_blocks={self.gpu_blocks} only applies with offload=True (the device cache "
                              "of offloaded blocks); set offload=True or leave gpu_blocks None")
        if self.gpu_blocks is not None and self.gpu_blocks < self.topk:
            raise ConfigError(f"{owner}.gpu_blocks={self.gpu_blocks} is below topk={self.topk}: one selection needs "
                              "at least topk blocks on the device; use gpu_blocks >= topk")


# --------------------------------------------------------------------------- quantized KV cache
_KV_BITS = (2, 3, 4, 16)
_KV_KEY_AXES = ("token", "channel")


@dataclass(frozen=True)
class KVCacheConfig:
    """A quantized KV cache (TurboQuant-style rotation + scalar codes + optional QJL; KIVI as a baseline).

    Shared by every host: ``apply_patches(model, kv_cache=KVCacheConfig(...))`` (transformers, see
    ``docs/kv_cache.md``) and the vLLM plugin read the same fields with the same meaning. Every field but
    ``residual_length`` is one of :class:`longkit.kernels.kv_quant.KVQuantSpec` (:meth:`spec` builds it; they are
    checked by the same rules here, without importing the kernels); ``residual_length`` belongs to the cache.

    Args:
        key_bits: bits per stored key channel: 2, 3, 4, or 16 (keys stored raw in 16 bits).
        value_bits: bits per stored value channel: 2, 3, 4, or 16.
        group_size: elements sharing one fp16 scale and zero (a divisor of the head dim; with ``key_axis="channel"``
            keys are grouped over this many tokens instead).
        key_axis: ``"token"`` (key groups along the head dim) or ``"channel"`` (KIVI: per-channel key scales over
            groups of ``group_size`` tokens).
        rotate: randomized Hadamard rotation of post-RoPE keys (and queries) and of values before quantization
            (power-of-two head dims).
        qjl: 1-bit QJL sketch of the key quantization residual, which makes the score estimate unbiased.
        qjl_dim: QJL projections, a multiple of 16 in [16, 1024]; ``None`` = the stored key dim. Needs ``qjl``.
        keep_channels: fraction of key channels stored (ThinK), in (0, 1]; chosen per KV head from the prompt.
        seed: seed of the rotation signs and the QJL matrix (mixed with the layer index).
        codebook: TurboQuant's scalar quantizer instead of min/max groups: the Lloyd-Max codebook of the Gaussian
            scaled by one fp16 RMS per group (no zero point). With ``group_size`` = the head dim, 3 bits store
            5.12x less than bf16 at head dim 128 (4.92x at 64).
        residual_length: the newest tokens kept in full precision (KIVI's residual window): a token is quantized
            when it leaves this window. ``0`` quantizes every token once the forward that produced it is done.
    """

    key_bits: int = 4
    value_bits: int = 4
    group_size: int = 32
    key_axis: str = "token"
    rotate: bool = True
    qjl: bool = False
    qjl_dim: int | None = None
    keep_channels: float = 1.0
    seed: int = 0
    residual_length: int = 128
    codebook: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        set_ = object.__setattr__  # normalised values (numpy ints -> int) so equal configs compare and hash equal
        for name in ("key_bits", "value_bits"):
            value = getattr(self, name)
            if not isinstance(value, bool) and hasattr(value, "__index__"):
                value = int(value.__index__())
            set_(self, name, check_choice(owner, name, value, _KV_BITS))
        set_(self, "group_size", check_int(owner, "group_size", self.group_size, min=1, max=4096))
        check_choice(owner, "key_axis", self.key_axis, _KV_KEY_AXES)
        check_bool(owner, "rotate", self.rotate)
        check_bool(owner, "qjl", self.qjl)
        set_(self, "qjl_dim", check_int(owner, "qjl_dim", self.qjl_dim, min=16, max=1024, allow_none=True,
                                        want="None or a multiple of 16 in [16, 1024]"))
        if self.qjl_dim is not None and self.qjl_dim % 16:
            raise ConfigError(f"{owner}.qjl_dim must be a multiple of 16 (whole, even bytes of sign bits), got "
                              f"{self.qjl_dim}; e.g. {max(16, 16 * round(self.qjl_dim / 16))}")
        if self.qjl_dim is not None and not self.qjl:
            raise ConfigError(f"{owner}.qjl_dim={self.qjl_dim} is set but qjl=False: pass qjl=True or drop qjl_dim")
        set_(self, "keep_channels", check_number(owner, "keep_channels", self.keep_channels, min=0.0, max=1.0,
                                                 min_exclusive=True))
        set_(self, "seed", check_int(owner, "seed", self.seed, min=0, max=2 ** 63 - 1))
        set_(self, "residual_length", check_int(owner, "residual_length", self.residual_length, min=0))
        if self.qjl and self.key_bits == 16:
            raise ConfigError(f"{owner}: qjl=True sketches the key quantization residual, but key_bits=16 stores keys "
                              "exactly (no residual): use key_bits in (2, 3, 4) or qjl=False")
        if self.key_axis == "channel" and self.key_bits == 16:
            raise ConfigError(f"{owner}: key_axis='channel' sets how keys are quantized, but key_bits=16 stores them "
                              "raw: use key_axis='token' with key_bits=16")
        check_kv_codebook(owner, self)

    def spec(self) -> Any:  # noqa: ANN401 - a KVQuantSpec (imported lazily: this module imports no kernel)
        """The kernels' :class:`~longkit.kernels.kv_quant.KVQuantSpec` of these options (without the window)."""
        from .kernels.kv_quant import KVQuantSpec

        names = [f.name for f in fields(self) if f.name != "residual_length"]
        return KVQuantSpec(**{n: getattr(self, n) for n in names})

    @classmethod
    def from_spec(cls, spec: Any, residual_length: int = 128) -> KVCacheConfig:  # noqa: ANN401
        """The config of a :class:`~longkit.kernels.kv_quant.KVQuantSpec` plus a full-precision window."""
        names = [f.name for f in fields(cls) if f.name != "residual_length"]
        missing = [n for n in names if not hasattr(spec, n)]
        if missing:
            raise ConfigError(f"KVCacheConfig.from_spec needs a KVQuantSpec, got {type(spec).__name__} (no {missing})")
        return cls(**{n: getattr(spec, n) for n in names}, residual_length=residual_length)

    @classmethod
    def identity(cls, residual_length: int = 128) -> KVCacheConfig:
        """16-bit keys and values, no rotation: the cache stores its input unchanged (a test setting)."""
        return cls(key_bits=16, value_bits=16, rotate=False, residual_length=residual_length)

    @classmethod
    def kivi(cls, bits: int = 2, group_size: int = 32, residual_length: int = 128) -> KVCacheConfig:
        """KIVI (Liu et al., 2024), the baseline: no rotation, per-channel key scales over ``group_size`` tokens,
        per-token value scales, ``bits`` for both, and a full-precision window of ``residual_length`` tokens."""
        return cls(key_bits=bits, value_bits=bits, group_size=group_size, key_axis="channel", rotate=False,
                   residual_length=residual_length)
