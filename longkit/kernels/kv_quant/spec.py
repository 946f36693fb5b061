"""What a quantized KV cache stores: :class:`KVQuantSpec` (the options) and :class:`RecordLayout` (the bytes).

Every token of every KV head is stored as one fixed-size byte *record* (keys and values together), so a cache is
one ``uint8`` buffer ``[B, Hkv, T, record_bytes]`` and appending a token writes ``record_bytes`` bytes per head.
Fields, in this order (2-byte fields first, so every fp16 view is aligned; every size below is even):

========== ======================= =====================================================================
field      dtype and count         content
========== ======================= =====================================================================
k_scale    fp16 × Dk / group_size  key group scales (``key_axis="token"`` only; the group RMS with ``codebook``)
k_zero     fp16 × Dk / group_size  key group minima (not with ``codebook``)
v_scale    fp16 × D / group_size   value group scales (``value_bits < 16``; the group RMS with ``codebook``)
v_zero     fp16 × D / group_size   value group minima (not with ``codebook``)
k_rnorm    fp16 × 1                ``||k - dequant(k)||`` of the (rotated, kept) key (``qjl`` only)
k_codes    uint8 × Dk·key_bits/8   packed key codes; with ``key_bits=16`` the raw key, ``Dk`` 16-bit values
v_codes    uint8 × D·value_bits/8  packed value codes; with ``value_bits=16`` the raw value
k_qjl      uint8 × qjl_dim/8       sign bits of ``S·(k - dequant(k))`` (``qjl`` only)
========== ======================= =====================================================================

With ``key_axis="channel"`` (KIVI) the key scales and minima are per (group of ``group_size`` tokens, channel) and
live in two separate fp16 tensors ``[B, Hkv, T / group_size, Dk]``; they cost ``4·Dk/group_size`` bytes per token
and head, counted by :func:`bytes_per_token`.

Packing (codes of ``b`` bits, ``n`` values): the values are cut into ``S = 8/b`` segments (2 and 4 bits) or
``S = 8`` segments (3 bits) of ``n/S`` consecutive values; word ``p`` (one byte, or three bytes for 3 bits) holds
value ``p + s·n/S`` at bits ``[b·s, b·s + b)``. The three bytes of a 3-bit word are stored as three byte planes
(bytes ``[0, n/8)``, ``[n/8, 2n/8)``, ``[2n/8, 3n/8)``: bits 0-7, 8-15, 16-23). So 3 bits really take 3 bits per
value (8 values per 3 bytes), no value straddles a word, and neighbouring channels sit in neighbouring bytes.
QJL sign bits use the 1-bit case of the same rule (bit ``s`` of byte ``p`` is projection ``p + s·m/8``; 1 = ``+``).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

from longkit._validate import BUILTIN, check_bool, check_choice, check_int, check_kv_codebook, check_number
from longkit.errors import ConfigError

__all__ = ["KVQuantSpec", "RecordLayout", "record_layout", "bytes_per_token", "validate_head_dim", "gaussian_codebook",
           "BITS", "KEY_AXES", "MAX_HEAD_DIM"]

BITS = (2, 3, 4, 16)
KEY_AXES = ("token", "channel")
MAX_HEAD_DIM = 256
_ALIGN = 16  # head dims, kept key dims and qjl_dim are multiples of this (3-bit words and even byte counts)


@dataclass(frozen=True)
class KVQuantSpec:
    """Options of a quantized KV cache (TurboQuant-style rotation + scalar codes + QJL; KIVI as a baseline).

    Quantization is asymmetric min/max per group by default: ``scale = (max - min) / (2**bits - 1)``, ``zero =
    min`` (both stored in fp16), ``code = clamp(floor((x - zero) / scale + 1/2), 0, 2**bits - 1)``, ``x̂ =
    code·scale + zero``, so ``|x - x̂| <= scale/2`` up to the fp16 rounding of ``zero`` and ``scale`` (a relative
    ``2**-11`` of the group's largest magnitude). With ``codebook=True`` (TurboQuant's scalar quantizer) each group
    stores only ``scale = fp16(RMS of the group)`` and ``x̂ = c[code]·scale`` with ``c`` the Lloyd-Max codebook of
    the standard Gaussian (:func:`gaussian_codebook`), the nearest centroid to ``x / scale``: after the rotation
    the coordinates of a vector are close to Gaussian, and half the side bytes go (3 bits with one group per
    head of 128 channels: 50 bytes per key or value instead of 256 in bf16, 5.12x). See
    ``longkit/kernels/kv_quant/__init__.py`` for the error of each choice.

    Args:
        key_bits: bits per stored key channel: 2, 3, 4, or 16 (no quantization: raw 16-bit keys).
        value_bits: bits per stored value channel: 2, 3, 4, or 16.
        group_size: elements sharing one scale and zero. Values: ``group_size`` consecutive channels of one token
            (must divide the head dim). Keys with ``key_axis="token"``: ``group_size`` consecutive (kept) channels of
            one token (must divide the kept key dim); with ``key_axis="channel"``: one channel over ``group_size``
            consecutive tokens (writes must then start and end on a multiple of ``group_size`` tokens).
        key_axis: ``"token"`` (groups along the head dim; every token is quantized on its own) or ``"channel"``
            (KIVI's per-channel key scales over token groups; the cache keeps the tokens of an unfinished group in
            full precision).
        rotate: apply a randomized Hadamard rotation ``x -> H·diag(signs)·x / sqrt(n)`` to the (kept) post-RoPE
            keys and to the values before quantization, and the same rotation to the query at read time; the
            output is rotated back. Needs power-of-two dims. Spreads outlier channels over all channels, so one
            scale fits a group far better. Signs are drawn from ``seed`` (per layer and head).
        qjl: store a 1-bit Quantized Johnson-Lindenstrauss sketch of the key residual ``r = k - dequant(k)``
            (``sign(S·r)`` with ``S`` an ``[qjl_dim, Dk]`` standard Gaussian matrix drawn from ``seed``) and
            ``||r||``; attention then adds the unbiased estimate ``sqrt(pi/2)/m · ||r|| · <S·q, sign(S·r)>`` of
            ``<q, r>`` to every score. Needs ``key_bits < 16``.
        qjl_dim: projections ``m`` of the sketch, a multiple of 16 in [16, 1024]; ``None`` = the kept key dim.
        keep_channels: fraction of key channels stored (ThinK-style pruning), in (0, 1]. The kept count is
            ``keep_channels · head_dim`` rounded to the nearest multiple of 16 (at least 16); which channels is
            per-KV-head state chosen from a calibration statistic (:meth:`KVQuantState.calibrate`). Pruned
            channels contribute nothing to the scores. Values are never pruned.
        seed: seed of the rotation signs and the QJL matrix (combined with the layer index by the state).
        codebook: Lloyd-Max Gaussian codebook scaled by one fp16 RMS per group instead of min/max groups (no
            zero point stored). Meant for rotated data; ``key_axis="token"`` only.

    Examples::

        >>> from longkit.kernels.kv_quant import KVQuantSpec, bytes_per_token
        >>> bytes_per_token(KVQuantSpec(key_bits=3, value_bits=3, group_size=64), head_dim=64, num_kv_heads=3)
        168
        >>> KVQuantSpec.kivi(bits=2).rotate
        False
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
    codebook: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        set_ = object.__setattr__  # frozen: store the normalised values (numpy ints -> int)
        set_(self, "key_bits", check_choice(owner, "key_bits", _as_int(self.key_bits), BITS))
        set_(self, "value_bits", check_choice(owner, "value_bits", _as_int(self.value_bits), BITS))
        set_(self, "group_size", check_int(owner, "group_size", self.group_size, min=1, max=4096))
        check_choice(owner, "key_axis", self.key_axis, KEY_AXES)
        check_bool(owner, "rotate", self.rotate)
        check_bool(owner, "qjl", self.qjl)
        set_(self, "qjl_dim", check_int(owner, "qjl_dim", self.qjl_dim, min=16, max=1024, allow_none=True,
                                        want="None or a multiple of 16 in [16, 1024]"))
        if self.qjl_dim is not None and self.qjl_dim % _ALIGN:
            raise ConfigError(f"{owner}.qjl_dim must be a multiple of 16 (whole, even bytes of sign bits), "
                              f"got {self.qjl_dim}; e.g. {_round_to(self.qjl_dim, _ALIGN)}")
        if self.qjl_dim is not None and not self.qjl:
            raise ConfigError(f"{owner}.qjl_dim={self.qjl_dim} is set but qjl=False: pass qjl=True or drop qjl_dim")
        set_(self, "keep_channels", check_number(owner, "keep_channels", self.keep_channels, min=0.0, max=1.0,
                                                 min_exclusive=True))
        set_(self, "seed", check_int(owner, "seed", self.seed, min=0, max=2 ** 63 - 1))
        if self.qjl and self.key_bits == 16:
            raise ConfigError(f"{owner}: qjl=True sketches the key quantization residual, but key_bits=16 stores "
                              "keys exactly (no residual): use key_bits in (2, 3, 4) or qjl=False")
        if self.key_axis == "channel" and self.key_bits == 16:
            raise ConfigError(f"{owner}: key_axis='channel' sets how keys are quantized, but key_bits=16 stores "
                              "them raw: use key_axis='token' with key_bits=16")
        check_kv_codebook(owner, self)

    # ------------------------------------------------------------------------- presets
    @classmethod
    def identity(cls) -> KVQuantSpec:
        """16-bit keys and values, no rotation, no pruning: the cache stores its input unchanged (a test setting)."""
        return cls(key_bits=16, value_bits=16, rotate=False)

    @classmethod
    def kivi(cls, bits: int = 2, group_size: int = 32) -> KVQuantSpec:
        """KIVI (Liu et al., 2024) as a baseline: no rotation, per-channel key scales over groups of ``group_size``
        tokens, per-token value scales over groups of ``group_size`` channels, ``bits`` for both.

        KIVI also keeps the most recent tokens in full precision; that window belongs to the cache, not to this
        spec (with ``key_axis="channel"`` a token group is quantized only once it is complete).
        """
        return cls(key_bits=bits, value_bits=bits, group_size=group_size, key_axis="channel", rotate=False)

    # ------------------------------------------------------------------------- derived sizes
    def key_dim(self, head_dim: int) -> int:
        """Stored key channels for ``head_dim``: ``keep_channels · head_dim`` rounded to a multiple of 16."""
        validate_head_dim(head_dim)
        if self.keep_channels == 1.0:
            return head_dim
        return max(_ALIGN, min(head_dim, _ALIGN * round(self.keep_channels * head_dim / _ALIGN)))

    def sketch_dim(self, head_dim: int) -> int:
        """QJL projections ``m`` (0 without QJL)."""
        if not self.qjl:
            return 0
        return self.qjl_dim if self.qjl_dim is not None else self.key_dim(head_dim)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` if this spec cannot store heads of ``head_dim`` channels (divisibility, powers of 2)."""
        validate_head_dim(head_dim)
        dk = self.key_dim(head_dim)
        if self.value_bits != 16 and head_dim % self.group_size:
            raise ValueError(f"KVQuantSpec.group_size={self.group_size} must divide the head dim {head_dim} (value "
                             f"groups run along the head dim); use a divisor such as {math.gcd(head_dim, 32)}")
        if self.key_bits != 16 and self.key_axis == "token" and dk % self.group_size:
            raise ValueError(f"KVQuantSpec.group_size={self.group_size} must divide the stored key dim {dk} "
                             f"(head dim {head_dim} × keep_channels {self.keep_channels}, rounded to a multiple of "
                             f"16); use group_size={math.gcd(dk, self.group_size)} or another keep_channels")
        if self.rotate:
            for name, n in (("head dim", head_dim), ("stored key dim", dk)):
                if n & (n - 1):
                    raise ValueError(f"KVQuantSpec.rotate=True needs a power-of-two {name} (Hadamard rotation), got "
                                     f"{n}; use rotate=False" + (" or keep_channels 0.5 / 0.25" if dk != head_dim
                                                                 else ""))


def _as_int(value: object) -> object:
    """numpy/torch integers -> int, everything else unchanged (``check_choice`` then reports it)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        return value
    return int(value.__index__())


def _round_to(n: int, m: int) -> int:
    return max(m, m * round(n / m))


def validate_head_dim(head_dim: int) -> int:
    """``head_dim`` as an int: a multiple of 16 in [16, 256]; raises ``TypeError``/``ValueError`` otherwise."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise TypeError(f"head_dim must be an int, got {head_dim!r} ({type(head_dim).__name__})")
    if head_dim < _ALIGN or head_dim > MAX_HEAD_DIM or head_dim % _ALIGN:
        raise ValueError(f"head_dim must be a multiple of 16 in [16, {MAX_HEAD_DIM}] for the packed KV cache, got "
                         f"{head_dim}")
    return head_dim


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one (token, KV head) record; see the module docstring. Offsets are in bytes.

    Attributes:
        head_dim: ``D``; key_dim: stored key channels ``Dk``; sketch_dim: QJL projections ``m`` (0 without QJL).
        k_groups / v_groups: scale groups per token in the record (``k_groups`` is 0 with ``key_axis="channel"``).
        fields: name -> ``(offset, nbytes)`` for every field present in the record.
        record_bytes: bytes of one record (the last dim of the cache buffer).
        side_bytes: bytes per token and head stored outside the record (KIVI key scales), possibly fractional.
    """

    head_dim: int
    key_dim: int
    sketch_dim: int
    k_groups: int
    v_groups: int
    fields: dict[str, tuple[int, int]]
    record_bytes: int
    side_bytes: float


def record_layout(spec: KVQuantSpec, head_dim: int) -> RecordLayout:
    """The record of one token and KV head for ``spec`` and ``head_dim`` (raises ``ValueError`` if incompatible)."""
    if not isinstance(spec, KVQuantSpec):
        raise TypeError(f"spec must be a KVQuantSpec, got {type(spec).__name__}")
    spec.check_head_dim(head_dim)
    D, Dk, m = head_dim, spec.key_dim(head_dim), spec.sketch_dim(head_dim)
    kq, vq = spec.key_bits != 16, spec.value_bits != 16
    k_groups = Dk // spec.group_size if kq and spec.key_axis == "token" else 0
    v_groups = D // spec.group_size if vq else 0
    zeros = 0 if spec.codebook else 1  # the codebook is zero-centred: no minima stored
    sizes = [  # (name, nbytes), 2-byte fields first
        ("k_scale", 2 * k_groups), ("k_zero", 2 * k_groups * zeros),
        ("v_scale", 2 * v_groups), ("v_zero", 2 * v_groups * zeros),
        ("k_rnorm", 2 if spec.qjl else 0),
        ("k_codes", Dk * spec.key_bits // 8),  # 16 bits: 2 bytes per raw value
        ("v_codes", D * spec.value_bits // 8),
        ("k_qjl", m // 8),
    ]
    fields, off = {}, 0
    for name, n in sizes:
        if n:
            fields[name] = (off, n)
            off += n
    side = 4.0 * Dk / spec.group_size if kq and spec.key_axis == "channel" else 0.0
    return RecordLayout(D, Dk, m, k_groups, v_groups, fields, off, side)


def bytes_per_token(spec: KVQuantSpec, head_dim: int, num_kv_heads: int) -> float:
    """Exact bytes stored per token and layer for keys and values together: ``num_kv_heads`` records plus, with
    ``key_axis="channel"``, the KIVI key scales' share (``4·Dk / group_size`` per head; an int unless that share is
    fractional). Codes, scales, zeros, QJL sign bits and residual norms are all counted; nothing is padded.

    A bf16 cache stores ``4 · head_dim · num_kv_heads`` bytes per token for comparison.
    """
    num_kv_heads = check_int("bytes_per_token", "num_kv_heads", num_kv_heads, min=1, errors=BUILTIN)
    lay = record_layout(spec, head_dim)
    total = num_kv_heads * (lay.record_bytes + lay.side_bytes)
    return int(total) if float(total).is_integer() else total


@functools.cache
def gaussian_codebook(bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(centroids, boundaries)`` of the Lloyd-Max quantizer of the standard Gaussian with ``2**bits`` levels
    (``bits`` in 2, 3, 4), both ascending and rounded to fp32; ``boundaries[i]`` is the midpoint of centroids
    ``i`` and ``i + 1``. A value ``y`` gets the code ``#{i : y > boundaries[i]}`` (its nearest centroid).

    Computed by Lloyd's iteration with the Gaussian's closed-form interval means (``(φ(a) - φ(b)) / (Φ(b) -
    Φ(a))``) until the centroids move less than ``1e-12``; e.g. 3 bits gives ``±0.2451, ±0.7560, ±1.3440,
    ±2.1520`` (Max, 1960).
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"gaussian_codebook: bits must be 2, 3 or 4, got {bits}")
    n = 2 ** bits
    c = [-3 + 6 * (i + 0.5) / n for i in range(n)]
    for _ in range(10000):
        edges = [-math.inf] + [(a + b) / 2 for a, b in zip(c, c[1:])] + [math.inf]
        new = [(_gauss_pdf(a) - _gauss_pdf(b)) / (_gauss_cdf(b) - _gauss_cdf(a)) for a, b in zip(edges, edges[1:])]
        done = max(abs(x - y) for x, y in zip(c, new)) < 1e-12
        c = new
        if done:
            break
    centroids = tuple(_to_fp32(x) for x in c)
    boundaries = tuple(_to_fp32((a + b) / 2) for a, b in zip(c, c[1:]))
    return centroids, boundaries


def _gauss_pdf(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # 0.0 at ±inf


def _gauss_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _to_fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value: the tables the kernels load are fp32, the reference uses the same."""
    return struct.unpack("f", struct.pack("f", x))[0]
