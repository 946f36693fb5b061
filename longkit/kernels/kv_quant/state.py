"""Per-layer state of a quantized KV cache: rotation signs, the QJL matrix, the kept key channels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longkit._validate import BUILTIN, check_int

from .spec import KVQuantSpec

__all__ = ["KVQuantState", "hadamard_matrix"]


def hadamard_matrix(n: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``n × n`` Sylvester Hadamard matrix (entries ±1, symmetric, ``H·H = n·I``), fp32; ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


def _generator(seed: int, layer_idx: int, stream: int) -> torch.Generator:
    """A CPU generator per (seed, layer, stream), so states are the same on every device and machine."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + layer_idx * 7919 + stream) % (2 ** 63 - 1))
    return g


def select_key_channels(q: torch.Tensor, k: torch.Tensor, key_dim: int) -> torch.Tensor:
    """ThinK's channel choice: int64 ``[Hkv, key_dim]`` (sorted) highest-scoring channels per KV head, scored by
    ``||k[:, h, :, c]|| · Σ_{query heads i of h} ||q[:, i, :, c]||`` (norms over batch and tokens)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"calibrate: q must be [B, Hq, Tq, D] and k [B, Hkv, T, D] with Hq % Hkv == 0, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    Hkv, D = k.shape[1], k.shape[-1]
    qn = q.float().pow(2).sum((0, 2)).sqrt().view(Hkv, -1, D).sum(1)  # [Hkv, D]
    kn = k.float().pow(2).sum((0, 2)).sqrt()  # [Hkv, D]
    return (qn * kn).topk(key_dim, dim=-1).indices.sort(dim=-1).values


@dataclass
class KVQuantState:
    """What one layer's packed cache needs besides its tokens. Build with :meth:`create`.

    The state is per layer (the cache holds one per layer) and is fixed once tokens are written: changing the kept
    channels or the seed afterwards makes the stored tokens unreadable.

    Attributes:
        spec: the spec.
        head_dim: ``D``; num_kv_heads: ``Hkv``; layer_idx: mixed into the seed (each layer its own rotation).
        key_dim: stored key channels ``Dk``.
        key_signs: fp32 ``[Hkv, Dk]`` ±1, the keys' (and queries') rotation signs; ``None`` without rotation.
        value_signs: fp32 ``[Hkv, D]`` ±1, the values' rotation signs; ``None`` without rotation.
        qjl_matrix: fp32 ``[m, Dk]`` standard Gaussian ``S`` (shared by the layer's heads); ``None`` without QJL.
        key_channels: int64 ``[Hkv, Dk]`` kept key channels per KV head (sorted); ``None`` = all channels (also
            the value while ``keep_channels < 1`` and :meth:`calibrate` has not run: writing then raises).
    """

    spec: KVQuantSpec
    head_dim: int
    num_kv_heads: int
    layer_idx: int
    key_dim: int
    key_signs: torch.Tensor | None
    value_signs: torch.Tensor | None
    qjl_matrix: torch.Tensor | None
    key_channels: torch.Tensor | None

    @classmethod
    def create(cls, spec: KVQuantSpec, head_dim: int, num_kv_heads: int, device: torch.device | str = "cpu", *,
               layer_idx: int = 0, key_channels: torch.Tensor | None = None) -> KVQuantState:
        """The state of layer ``layer_idx``: signs and QJL matrix drawn from ``spec.seed`` (on CPU, then moved).

        Args:
            spec: the spec.
            head_dim: ``D`` (checked against the spec: divisibility, powers of two for rotation).
            num_kv_heads: ``Hkv``.
            device: where the tensors live (the cache's device).
            layer_idx: layer index, mixed into the seed.
            key_channels: optional int ``[Hkv, Dk]`` kept channels (with ``keep_channels < 1``); else call
                :meth:`calibrate` before writing.
        """
        if not isinstance(spec, KVQuantSpec):
            raise TypeError(f"KVQuantState.create: spec must be a KVQuantSpec, got {type(spec).__name__}")
        spec.check_head_dim(head_dim)
        num_kv_heads = check_int("KVQuantState.create", "num_kv_heads", num_kv_heads, min=1, errors=BUILTIN)
        layer_idx = check_int("KVQuantState.create", "layer_idx", layer_idx, min=0, errors=BUILTIN)
        Dk, m = spec.key_dim(head_dim), spec.sketch_dim(head_dim)
        key_signs = value_signs = qjl = None
        if spec.rotate:
            g = _generator(spec.seed, layer_idx, 1)
            key_signs = (torch.randint(0, 2, (num_kv_heads, Dk), generator=g) * 2 - 1).float().to(device)
            value_signs = (torch.randint(0, 2, (num_kv_heads, head_dim), generator=g) * 2 - 1).float().to(device)
        if spec.qjl:
            qjl = torch.randn(m, Dk, generator=_generator(spec.seed, layer_idx, 2)).to(device)
        state = cls(spec, head_dim, num_kv_heads, layer_idx, Dk, key_signs, value_signs, qjl, None)
        if key_channels is not None:
            state.set_key_channels(key_channels)
        return state

    # ------------------------------------------------------------------------- kept channels (ThinK)
    @property
    def prunes(self) -> bool:
        """True when fewer key channels than ``head_dim`` are stored."""
        return self.key_dim < self.head_dim

    def set_key_channels(self, key_channels: torch.Tensor) -> KVQuantState:
        """Set the kept key channels: int ``[Hkv, Dk]``, distinct per head, in ``[0, D)`` (stored sorted)."""
        want = (self.num_kv_heads, self.key_dim)
        if (not isinstance(key_channels, torch.Tensor) or key_channels.is_floating_point()
                or key_channels.is_complex() or tuple(key_channels.shape) != want):
            got = (f"{key_channels.dtype} {tuple(key_channels.shape)}" if isinstance(key_channels, torch.Tensor)
                   else type(key_channels).__name__)
            raise ValueError(f"key_channels must be an integer tensor [Hkv, Dk] = {list(want)}, got {got}")
        idx = key_channels.to(torch.int64).sort(dim=-1).values
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.head_dim or (idx[:, 1:] == idx[:, :-1]).any()):
            raise ValueError(f"key_channels must hold distinct channel indices in [0, {self.head_dim}) per head")
        device = self.key_signs.device if self.key_signs is not None else key_channels.device
        if self.qjl_matrix is not None:
            device = self.qjl_matrix.device
        self.key_channels = idx.to(device)
        return self

    def calibrate(self, q: torch.Tensor, k: torch.Tensor) -> KVQuantState:
        """Choose the kept key channels per KV head from calibration queries and keys (ThinK's criterion).

        Channel ``c`` of KV head ``h`` scores ``||k[:, h, :, c]||₂ · Σ_{query heads i of h} ||q[:, i, :, c]||₂``
        (norms over batch and tokens), the magnitude of its contribution to ``q·k``; the ``Dk`` highest are kept.
        Pass the post-RoPE keys and queries of the prompt (or of its last window, as ThinK does), before the
        first write. The same channels serve every batch row.

        Args:
            q: ``[B, Hq, Tq, D]`` queries, ``Hq`` a multiple of ``Hkv``.
            k: ``[B, Hkv, T, D]`` keys.
        """

        self.set_key_channels(select_key_channels(q, k, self.key_dim))
        return self

    # ------------------------------------------------------------------------- dense rotations (kernels)
    def rotation(self, which: str) -> torch.Tensor | None:
        """Dense fp32 rotation matrices ``R[h] = H·diag(signs[h]) / sqrt(n)`` as ``[Hkv, n, n]`` for ``which`` in
        ``("key", "value")`` (the quantize kernel multiplies by them); ``None`` without rotation. Cached."""
        signs = {"key": self.key_signs, "value": self.value_signs}[which]
        if signs is None:
            return None
        cache = self.__dict__.setdefault("_rotations", {})
        hit = cache.get(which)
        if hit is not None and hit.device == signs.device:
            return hit
        n = signs.shape[-1]
        h = hadamard_matrix(n, device=signs.device) / math.sqrt(n)
        mats = (h[None] * signs[:, None, :]).contiguous()  # [Hkv, n, n]: R[h] x = H (s ⊙ x) / sqrt(n)
        cache[which] = mats
        return mats

    def to(self, device: torch.device | str) -> KVQuantState:
        """A copy of this state on ``device``."""
        mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return KVQuantState(self.spec, self.head_dim, self.num_kv_heads, self.layer_idx, self.key_dim,
                            mv(self.key_signs), mv(self.value_signs), mv(self.qjl_matrix), mv(self.key_channels))
