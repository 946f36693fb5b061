"""LASP-2 forwards for transformers' linear-attention layers, installed on single module instances.

Each function below replaces ``forward`` on one layer *instance* (the class is never touched) and computes what
transformers' own forward computes on the whole sequence, for this rank's chunk of it: the same projections,
activations, norms and gates (through the layer's own submodules, so ZeRO-3 and other module hooks still fire),
with the recurrence run by :mod:`.lasp2_core` from the state the earlier ranks leave behind.

* ``MiniMaxLightningAttention`` (``minimax``): silu on one qkv projection, zero at padding, lightning attention
  ``S_t = exp(-slope_h) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` (no 1/sqrt(d) scale; ``slope_h`` is the layer's
  ``slope_rate`` buffer), RMSNorm over all heads, sigmoid output gate, output projection.
* ``Qwen3NextGatedDeltaNet`` / ``Qwen3_5GatedDeltaNet`` / ``Qwen3_5MoeGatedDeltaNet``: projections, a causal
  depthwise convolution over time (kernel ``K``; under sequence parallelism each rank first receives the last
  ``K - 1`` convolution inputs of the previous rank), silu, q/k L2-normalised in fp32 (eps 1e-6), the gated
  delta rule with scale ``Dk ** -0.5`` in fp32, gated RMSNorm, output projection.
* ``KimiLinearDeltaAttention`` (``kimi_linear``): q/k/v projections, one causal depthwise convolution over their
  concatenation (halo as above), silu, the forget gate (one log gate per head and key channel) and ``beta``, Kimi
  delta attention by transformers' own ``chunk_kimi_delta_attention`` (q/k L2-normalised inside, fp32, scale
  ``Dk ** -0.5``) with :func:`~.lasp2_core.lasp2_host_delta_rule`'s state passing, gated RMSNorm, output projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .lasp2_comm import LASP2Comm, halo_from_previous
from .lasp2_core import lasp2_gated_delta_rule, lasp2_host_delta_rule, lasp2_linear_attention

__all__ = ["STATE_ATTR", "LinearLayerState", "LINEAR_LAYER_FORWARDS", "REQUIRED_ATTRS", "lightning_forward",
           "gated_delta_net_forward", "kimi_delta_forward", "host_function", "HOST_FUNCTIONS"]

STATE_ATTR = "_longkit_lasp2"
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "seq_idx")


@dataclass
class LinearLayerState:
    """What a patched layer needs: the group and the chunk size of the local recurrence."""

    comm: LASP2Comm
    chunk_size: int = 64


def _state(module: nn.Module) -> LinearLayerState:
    state = getattr(module, STATE_ATTR, None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} runs LASP-2's forward but was not prepared; use "
                           "longkit.deepspeed_ext.initialize(...) or SequenceParallel.prepare_model(model)")
    return state


# the KV-cache argument's names: past_key_values / cache_params up to transformers 5.23, cache since 5.24
_CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


def _refuse(module: nn.Module, cache: Any, kwargs: dict[str, Any]) -> None:  # noqa: ANN401
    if cache is None:
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is not None:
        raise NotImplementedError(f"LASP-2 sequence parallelism ({type(module).__name__}) is for training and "
                                  "prefill without a cache; pass use_cache=False (generation is not "
                                  "sequence-parallel)")
    packed = [k for k in _PACKED_KWARGS if kwargs.get(k) is not None]
    if packed:
        raise UnsupportedModelError(
            f"{type(module).__name__} got packed-sequence arguments {packed}: transformers' PyTorch path of this "
            "layer refuses cu_seqlens/seq_idx and does not reset its recurrent state between documents, so LASP-2 "
            "does not take packed documents either; put one document per row (pad instead of packing)")


def _mask_padding(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    # As transformers' apply_mask_to_padding_states: the linear layers get a 2-D padding mask (or None).
    if attention_mask is None:
        return x
    return (x * attention_mask[:, :, None]).to(x.dtype)


def lightning_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings: Any = None,  # noqa: ANN401
                      attention_mask: torch.Tensor | None = None, past_key_values: Any = None,  # noqa: ANN401
                      **kwargs: Any) -> tuple[torch.Tensor, None]:  # noqa: ANN401
    """``MiniMaxLightningAttention.forward`` on this rank's chunk ``hidden_states [B, T_local, hidden]``."""
    state = _state(self)
    _refuse(self, past_key_values, kwargs)
    B, T, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.head_dim
    qkv = _mask_padding(self.act_fn(self.qkv_proj(hidden_states)), attention_mask)
    q, k, v = (x.transpose(1, 2) for x in qkv.reshape(B, T, H, 3 * D).split(D, dim=3))
    log_decay = -self.slope_rate.reshape(H).float()
    out = lasp2_linear_attention(q, k, v, log_decay, scale=1.0, comm=state.comm, layer=self.layer_idx,
                                 chunk_size=state.chunk_size)
    out = self.norm(out.transpose(1, 2).reshape(B, T, H * D))
    out = torch.sigmoid(self.output_gate(hidden_states)) * out
    # transformers returns the final state as "attention weights"; nothing reads it without a cache.
    return self.out_proj(out), None


def _prologue(module: nn.Module, hidden_states: torch.Tensor, cache: Any,  # noqa: ANN401
              attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[LinearLayerState, torch.Tensor]:
    """The start of the delta-rule layers' forwards: their state, the refusals, padding zeroed."""
    state = _state(module)
    _refuse(module, cache, kwargs)
    return state, _mask_padding(hidden_states, attention_mask)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # transformers' (and fla's) form, in fp32: x / sqrt(sum(x^2) + eps).
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _causal_conv(module: nn.Module, x: torch.Tensor, comm: LASP2Comm) -> torch.Tensor:
    """The layer's depthwise causal convolution over time of ``x [B, C, T_local]``, continuing the previous
    rank's chunk (its last ``K - 1`` inputs arrive as a halo; zeros before the first token, as transformers'
    left padding), then the activation."""
    conv: nn.Conv1d = module.conv1d
    K, T = conv.kernel_size[0], x.shape[-1]
    if K > 1:
        if comm.world > 1:
            if T < K - 1:
                raise ConfigError(f"each rank needs at least {K - 1} tokens for {type(module).__name__}'s "
                                  f"convolution (kernel {K}), got {T}: use a longer sequence or a smaller "
                                  "longkit.sequence_parallel.size")
            halo = halo_from_previous(x[:, :, T - (K - 1):], comm, module.layer_idx)
        else:
            halo = x.new_zeros(*x.shape[:2], K - 1)
        x = torch.cat([halo, x], dim=-1)
    # Called as a module (not F.conv1d on its weight) so that hooks such as ZeRO-3's gather fire. The module pads
    # K - 1 on both sides; output column K - 1 + t is the window ending at local token t.
    out = conv(x.to(conv.weight.dtype))[:, :, K - 1: K - 1 + T]
    from transformers.activations import ACT2FN

    return ACT2FN[module.activation](out).to(x.dtype)


def gated_delta_net_forward(self: nn.Module, hidden_states: torch.Tensor, cache_params: Any = None,  # noqa: ANN401
                            attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:  # noqa: ANN401
    """``Qwen3NextGatedDeltaNet.forward`` / ``Qwen3_5GatedDeltaNet.forward`` on this rank's chunk."""
    state, hidden_states = _prologue(self, hidden_states, cache_params, attention_mask, kwargs)
    B, T, _ = hidden_states.shape
    Dk, Dv = self.head_k_dim, self.head_v_dim
    if hasattr(self, "in_proj_qkvz"):  # Qwen3-Next: fused, head-interleaved projections
        q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                             self.in_proj_ba(hidden_states))
        mixed = torch.cat([x.reshape(B, T, -1) for x in (q, k, v)], dim=-1)
    else:  # Qwen3.5: separate projections
        mixed = self.in_proj_qkv(hidden_states)
        z = self.in_proj_z(hidden_states).reshape(B, T, -1, Dv)
        b, a = self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)
    mixed = _causal_conv(self, mixed.transpose(1, 2), state.comm).transpose(1, 2)
    q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    q, k, v = q.reshape(B, T, -1, Dk), k.reshape(B, T, -1, Dk), v.reshape(B, T, -1, Dv)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # fp32 as transformers (A may be -inf)
    rep = self.num_v_heads // self.num_k_heads
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    # transformers' PyTorch path runs the recurrence in fp32 on L2-normalised q, k with scale Dk^-0.5.
    q, k = _l2norm(q.float()), _l2norm(k.float())
    out = lasp2_gated_delta_rule(q.transpose(1, 2), k.transpose(1, 2), v.float().transpose(1, 2),
                                 g.transpose(1, 2).contiguous(), beta.float().transpose(1, 2).contiguous(),
                                 scale=Dk ** -0.5, comm=state.comm, layer=self.layer_idx,
                                 chunk_size=state.chunk_size)
    out = out.transpose(1, 2).to(hidden_states.dtype)  # [B, T, Hv, Dv]
    out = self.norm(out.reshape(-1, Dv), z.reshape(-1, Dv)).reshape(B, T, -1)
    return self.out_proj(out)


def host_function(module: nn.Module, name: str) -> Any:  # noqa: ANN401
    """``name`` from the transformers module that defines ``module``'s class (so the host's own function runs)."""
    import sys

    fn = getattr(sys.modules[type(module).__module__], name, None)
    if fn is None:
        import transformers

        raise UnsupportedModelError(f"LASP-2: {type(module).__module__} in transformers {transformers.__version__} "
                                    f"has no {name}; this version's {type(module).__name__} is not supported")
    return fn


def kimi_delta_forward(self: nn.Module, hidden_states: torch.Tensor, cache_params: Any = None,  # noqa: ANN401
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:  # noqa: ANN401
    """``KimiLinearDeltaAttention.forward`` on this rank's chunk."""
    state, hidden_states = _prologue(self, hidden_states, cache_params, attention_mask, kwargs)
    B, T, _ = hidden_states.shape
    shape = (B, T, -1, self.head_dim)
    mixed = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1)
    mixed = _causal_conv(self, mixed.transpose(1, 2), state.comm).transpose(1, 2)
    q, k, v = (x.reshape(shape) for x in torch.split(mixed, [self.qkv_dim] * 3, dim=-1))
    g = self.forget_gate(hidden_states)  # [B, T, H, Dk] log gates (fp32), through the module: its hooks fire
    beta = torch.sigmoid(self.b_proj(hidden_states))
    out = lasp2_host_delta_rule(host_function(self, "chunk_kimi_delta_attention"), q, k, v, g, beta,
                                comm=state.comm, layer=self.layer_idx)
    gate = self.g_b_proj(self.g_a_proj(hidden_states)).reshape(shape)
    return self.o_proj(self.o_norm(out, gate).reshape(B, T, -1))


# Layer class name -> its LASP-2 forward; REQUIRED_ATTRS: what that forward reads (checked before patching, so a
# transformers release that renames one fails at install with the name, not mid-step).
LINEAR_LAYER_FORWARDS = {
    "MiniMaxLightningAttention": lightning_forward,
    "Qwen3NextGatedDeltaNet": gated_delta_net_forward,
    "Qwen3_5GatedDeltaNet": gated_delta_net_forward,
    "Qwen3_5MoeGatedDeltaNet": gated_delta_net_forward,
    "KimiLinearDeltaAttention": kimi_delta_forward,
}
_GDN = ("layer_idx", "conv1d", "activation", "A_log", "dt_bias", "norm", "out_proj", "head_k_dim", "head_v_dim",
        "key_dim", "value_dim", "num_k_heads", "num_v_heads")
REQUIRED_ATTRS = {
    "MiniMaxLightningAttention": ("layer_idx", "num_attention_heads", "head_dim", "act_fn", "qkv_proj", "slope_rate",
                                  "norm", "output_gate", "out_proj"),
    "Qwen3NextGatedDeltaNet": _GDN + ("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering"),
    "Qwen3_5GatedDeltaNet": _GDN + ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
    "Qwen3_5MoeGatedDeltaNet": _GDN + ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
    "KimiLinearDeltaAttention": ("layer_idx", "head_dim", "qkv_dim", "q_proj", "k_proj", "v_proj", "conv1d",
                                 "activation", "forget_gate", "b_proj", "g_a_proj", "g_b_proj", "o_norm", "o_proj"),
}
# Functions of the layer's transformers module that its LASP-2 forward calls (checked at install, like REQUIRED_ATTRS).
HOST_FUNCTIONS = {"KimiLinearDeltaAttention": ("chunk_kimi_delta_attention",)}
