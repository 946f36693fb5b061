"""Worker for the LASP-2 gloo tests: sequence-parallel runs vs one process, per scenario.

Run by tests/deepspeed_ext/test_lasp2_dist.py as
``python -m torch.distributed.run --nproc_per_node P lasp2_worker.py OUT SCENARIO...``. Every rank builds the
same inputs (seed from ``LONGKIT_SP_SEED``, fresh per test run), computes the one-process reference on the whole
sequence itself, then its shard under sequence parallelism, and writes numbers (errors, scales, byte counts) to
``OUT.rank<r>``; the test asserts on them. Also imported by the unit tests for the tiny model configs.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback

import torch

# The repository root first: the worker runs as a script, and longkit must be this checkout's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SEED = int(os.environ.get("LONGKIT_SP_SEED", "1234"))

# Tiny random configs of the real architectures: hidden 64, heads 4 (head dim 16), 4 layers (linear, softmax,
# linear, softmax), vocab 128; initializer_range 0.2 so the recurrent state carries real signal across chunks.
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
               layer_types=["linear_attention", "full_attention"] * 2)
_GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
TINY = {
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                dict(num_local_experts=2, num_experts_per_tok=1, block_size=16)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(_GDN, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(_GDN)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(_GDN, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32)),
    # Kimi-Linear: KDA layers (4 heads of 16, conv kernel 4), MLA softmax layers (no q LoRA), MoE after layer 0
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM",
                    dict(num_key_value_heads=4, linear_num_heads=4, linear_head_dim=16, linear_conv_kernel_dim=4,
                         kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         num_local_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, n_group=1,
                         topk_group=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def tiny_linear_model(kind: str, **overrides):
    """A tiny random ``kind`` model (see :data:`TINY`) in train mode: sdpa attention, eager MoE experts."""
    import transformers

    cfg_name, model_name, extra = TINY[kind]
    cfg = getattr(transformers, cfg_name)(**{**_COMMON, **extra, **overrides})
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"  # grouped_mm has no fp64, and the fp64 copy is the tests' reference
    model = getattr(transformers, model_name)(cfg).train()
    for m in model.modules():
        if hasattr(m, "A_log"):  # slow Gated DeltaNet decays (exp(A) in [0.02, 0.3]): the state outlives a chunk
            with torch.no_grad():
                m.A_log.copy_(torch.empty_like(m.A_log).uniform_(0.02, 0.3).log())
    return model


# ------------------------------------------------------------------------------------------------ op level
def _loop_decay(q, k, v, log_decay, scale, S=None):
    """Token-by-token scalar-decay recurrence in fp64 (independent of the kernels package)."""
    B, H, T, Dk = q.shape
    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64) if S is None else S
    g = log_decay.double().view(1, H, 1).expand(B, H, T) if log_decay.dim() == 1 else log_decay.double()
    out = []
    for t in range(T):
        S = g[:, :, t].exp()[..., None, None] * S + k[:, :, t, :, None].double() * v[:, :, t, None, :].double()
        out.append(scale * (q[:, :, t, :, None].double() * S).sum(-2))
    return torch.stack(out, 2), S


def _loop_delta(q, k, v, g, beta, scale, S=None):
    """Token-by-token gated delta rule in fp64 (independent of the kernels package)."""
    B, H, T, Dk = q.shape
    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64) if S is None else S
    out = []
    for t in range(T):
        kt, vt, bt = k[:, :, t].double(), v[:, :, t].double(), beta[:, :, t].double()
        S = g[:, :, t].double().exp()[..., None, None] * S
        S = S + kt[..., :, None] * ((vt - (kt[..., :, None] * S).sum(-2)) * bt[..., None])[..., None, :]
        out.append(scale * (q[:, :, t, :, None].double() * S).sum(-2))
    return torch.stack(out, 2), S


def _op_inputs(kind: str, B: int, H: int, T: int, D: int, gen: torch.Generator) -> dict:
    x = {n: torch.randn(B, H, T, D, generator=gen) for n in ("q", "k", "v")}
    if kind == "decay":
        x["log_decay"] = -torch.rand(H, generator=gen) * 0.2  # slow decays: the state matters across chunks
    else:
        x["k"] = torch.nn.functional.normalize(x["k"], dim=-1)
        x["g"] = -torch.rand(B, H, T, generator=gen) * 0.1
        x["beta"] = torch.rand(B, H, T, generator=gen)
    return x


def ops(world_rank: tuple) -> dict:
    """lasp2_linear_attention / lasp2_gated_delta_rule on random inputs vs one sequential fp64 run: outputs and
    the gradients of every input; bytes per call at two lengths; and the error without state passing."""
    import torch.distributed as dist

    from longkit.deepspeed_ext.lasp2_comm import CommStats, LASP2Comm
    from longkit.deepspeed_ext.lasp2_core import lasp2_gated_delta_rule, lasp2_linear_attention
    from longkit.kernels import linear_attn as la

    rank, world = world_rank
    comm = LASP2Comm(dist.group.WORLD, rank, world, CommStats())
    res: dict = {}
    for kind in ("decay", "delta"):
        for T in (16 * world, 40 * world):  # two lengths: the bytes must not change; 40: not a multiple of 64
            gen = torch.Generator().manual_seed(SEED + T)
            B, H, D = 2, 2, 8
            full = _op_inputs(kind, B, H, T, D, gen)
            w = torch.randn(B, H, T, D, generator=gen)  # upstream gradient
            lo, hi = rank * T // world, (rank + 1) * T // world
            seq_keys = [n for n in full if n != "log_decay"]
            local = {n: (full[n][:, :, lo:hi] if n in seq_keys else full[n]).clone().requires_grad_(True)
                     for n in full}
            comm.stats.reset()
            if kind == "decay":
                out = lasp2_linear_attention(local["q"], local["k"], local["v"], local["log_decay"], scale=0.5,
                                             comm=comm, layer=0)
            else:
                out = lasp2_gated_delta_rule(local["q"], local["k"], local["v"], local["g"], local["beta"],
                                             scale=0.5, comm=comm, layer=0)
            (out * w[:, :, lo:hi]).sum().backward()
            ref = {n: t.double().clone().requires_grad_(True) for n, t in full.items()}
            if kind == "decay":
                ref_out, _ = _loop_decay(ref["q"], ref["k"], ref["v"], ref["log_decay"], 0.5)
                # no state passing (each rank from zero, as a sequence-parallel run that restarts the state):
                cut, _ = _loop_decay(*(full[n][:, :, lo:hi] for n in ("q", "k", "v")), full["log_decay"], 0.5)
            else:
                ref_out, _ = _loop_delta(ref["q"], ref["k"], ref["v"], ref["g"], ref["beta"], 0.5)
                cut, _ = _loop_delta(*(full[n][:, :, lo:hi] for n in ("q", "k", "v", "g", "beta")), 0.5)
            (ref_out * w.double()).sum().backward()
            # One process in fp32 through the same kernels: the error budget (at most twice its error vs fp64).
            one = {n: t.clone().requires_grad_(True) for n, t in full.items()}
            if kind == "decay":
                one_out, _ = la.linear_attention(one["q"], one["k"], one["v"], one["log_decay"], scale=0.5)
            else:
                one_out, _ = la.gated_delta_rule(one["q"], one["k"], one["v"], one["g"], one["beta"], scale=0.5)
            (one_out * w).sum().backward()
            errs = {"out": (out.double() - ref_out[:, :, lo:hi]).abs().max().item()}
            base = {"out": (one_out.double() - ref_out).abs().max().item()}
            scales = {"out": ref_out.abs().max().item()}
            for n in local:
                g = local[n].grad.double()
                want = ref[n].grad[:, :, lo:hi] if n in seq_keys else ref[n].grad
                if n not in seq_keys:  # a per-head parameter: every rank holds a part of its gradient
                    dist.all_reduce(g)
                errs[n] = (g - want).abs().max().item()
                base[n] = (one[n].grad.double() - ref[n].grad).abs().max().item()
                scales[n] = want.abs().max().item()
            res[f"{kind}_T{T}"] = {
                "errs": errs, "one_process_errs": base, "scales": scales, "per_layer": comm.stats.per_layer(),
                "calls": {f"{k[1]}/{k[2]}": v for k, v in comm.stats.calls().items()},
                "no_state_err": (cut - ref_out[:, :, lo:hi].detach()).abs().max().item(),
                "summary_numel": B * H * (D * D + (1 if kind == "decay" else D * D)),
            }
    return res


# ------------------------------------------------------------------------------------------------ model level
def make_batch(kind: str, B: int, T: int, vocab: int, gen: torch.Generator) -> dict:
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    if kind in ("right_pad", "left_pad"):
        mask = torch.ones(B, T, dtype=torch.long)
        for b in range(1, B):
            n = 7 * b
            if kind == "right_pad":
                mask[b, T - n:] = 0
            else:
                mask[b, :n] = 0
                labels[b, n] = -100  # predicted from a pad position: not a defined target
        labels[mask == 0] = -100
        batch["attention_mask"] = mask
    elif kind == "packed":
        pos = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)]).unsqueeze(0).expand(B, T)
        batch["position_ids"] = pos
    return batch


def reference(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# name: (model kind, batch kind, B, T, zero stage or None (plain torch.distributed, no DeepSpeed), mode, overrides)
MODEL_SCENARIOS = {
    "minimax": ("minimax", "plain", 2, 64, None, "lasp2", {}),
    "qwen3_next": ("qwen3_next", "plain", 2, 64, None, "lasp2", {}),
    "qwen3_5_right_pad": ("qwen3_5", "right_pad", 2, 62, None, "lasp2", {}),
    "qwen3_5_moe_left_pad": ("qwen3_5_moe", "left_pad", 2, 64, None, "auto", {}),
    "minimax_left_pad_uneven": ("minimax", "left_pad", 2, 61, None, "auto", {}),
    "minimax_all_linear": ("minimax", "plain", 1, 64, None, "lasp2", {"layer_types": ["linear_attention"] * 4}),
    "qwen3_next_ckpt": ("qwen3_next", "right_pad", 2, 48, None, "lasp2", {}),  # + gradient checkpointing
    "qwen3_next_bf16": ("qwen3_next", "plain", 1, 64, None, "lasp2", {}),
    "minimax_z1": ("minimax", "plain", 1, 64, 1, "lasp2", {}),
    "qwen3_next_z2": ("qwen3_next", "plain", 1, 64, 2, "lasp2", {}),
    "qwen3_5_z3": ("qwen3_5", "plain", 1, 64, 3, "auto", {}),
    "kimi_linear": ("kimi_linear", "plain", 2, 64, None, "lasp2", {}),
    "kimi_linear_left_pad": ("kimi_linear", "left_pad", 2, 62, None, "auto", {}),
    # MLA value heads narrower than query/key heads (Kimi-Linear: 128 vs 192), padded rows: Ulysses' kernel path
    "kimi_linear_mla_dims": ("kimi_linear", "right_pad", 2, 64, None, "lasp2", {"v_head_dim": 8}),
}


def _grad_error(grads: dict, ref: dict) -> tuple[float, str]:
    err, worst = 0.0, ""
    for n, g in ref.items():
        d = (grads[n].double() - g.double()).abs().max().item()
        if d > err:
            err, worst = d, n
    return err, worst


def run_model(name: str, broken: str | None = None) -> dict:
    """One scenario: the loss and every parameter's gradient of one forward + backward under sequence parallelism,
    of the same model in one process (fp32) and of that model in fp64 (the reference both are measured against).

    ``broken``: a deliberately wrong variant that the test must catch: ``"no_state"`` (every rank starts its
    chunk from a zero state, as a sequence-parallel run that restarts the recurrence) or ``"no_halo"`` (the
    convolution sees zeros instead of the previous rank's last tokens).
    """
    import torch.distributed as dist

    from longkit.deepspeed_ext import SequenceParallel, SequenceParallelConfig, lasp2_core, lasp2_models
    from longkit.deepspeed_ext.lasp2 import comm_stats

    kind, batch_kind, B, T, stage, mode, overrides = MODEL_SCENARIOS[name]
    world = dist.get_world_size()
    torch.manual_seed(SEED)
    model = tiny_linear_model(kind, **overrides)
    batch = make_batch(batch_kind, B, T, model.config.vocab_size, torch.Generator().manual_seed(SEED + 1))
    f64_loss, f64_grads = reference(copy.deepcopy(model).double(), batch)
    if "bf16" in name:
        model = model.to(torch.bfloat16)
    ref_loss, ref_grads = reference(model, batch)
    sp_model = copy.deepcopy(model)
    sp_model.zero_grad(set_to_none=True)
    if "ckpt" in name:
        sp_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if broken == "no_state":
        real = lasp2_core.prefix_state
        lasp2_core.prefix_state = lambda summary, *a: real(summary, *a) * 0  # the exchange runs, its result is lost
    if broken == "no_halo":
        real = lasp2_models.halo_from_previous
        lasp2_models.halo_from_previous = lambda tail, *a: real(tail, *a) * 0
    try:
        if stage is None:
            sp = SequenceParallel(SequenceParallelConfig(mode=mode, size=world))
            sp.prepare_model(sp_model)
            shard = sp.shard_batch(batch)
            comm_stats(sp_model).reset()
            loss = sp_model(**shard).loss
            loss.backward()
            grads = {}
            for n, p in sp_model.named_parameters():
                g = p.grad.detach().float().clone()
                dist.all_reduce(g)  # what DeepSpeed's data-parallel averaging does (reduce_loss scaled by the group)
                grads[n] = g / world
            stats = comm_stats(sp_model)
        else:
            from deepspeed.utils import safe_get_full_grad

            from longkit.deepspeed_ext import initialize

            config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
                      "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True,
                      "zero_optimization": {"stage": stage},
                      "longkit": {"sequence_parallel": {"mode": mode, "size": world}}}
            engine, *_, sp = initialize(sp_model, config, model_parameters=sp_model.parameters())
            shard = sp.shard_batch(batch)
            comm_stats(engine.module).reset()
            loss = engine(**shard).loss
            engine.backward(loss)
            grads = {n: safe_get_full_grad(p).float().cpu() for n, p in engine.module.named_parameters()}
            stats = comm_stats(engine.module)
    finally:
        if broken == "no_state":
            lasp2_core.prefix_state = real
        if broken == "no_halo":
            lasp2_models.halo_from_previous = real
    sp_err, worst = _grad_error(grads, f64_grads)
    fp32_err, _ = _grad_error(ref_grads, f64_grads)
    return {"f64_loss": f64_loss, "ref_loss": ref_loss, "sp_loss": float(loss.detach()),
            "sp_grad_err": sp_err, "fp32_grad_err": fp32_err, "worst_param": worst,
            "grad_scale": max(g.abs().max().item() for g in f64_grads.values()), "n_params": len(ref_grads),
            "n_grads": len(grads), "per_layer": stats.per_layer(), "local_tokens": int(shard["input_ids"].shape[1])}


def bytes_vs_length() -> dict:
    """Per-layer bytes of one forward + backward at two sequence lengths (hybrid Qwen3-Next, LASP-2H)."""
    import torch.distributed as dist

    from longkit.deepspeed_ext import SequenceParallel, SequenceParallelConfig
    from longkit.deepspeed_ext.lasp2 import comm_stats

    world = dist.get_world_size()
    torch.manual_seed(SEED)
    model = tiny_linear_model("qwen3_next")
    sp = SequenceParallel(SequenceParallelConfig(mode="lasp2", size=world))
    sp.prepare_model(model)
    out = {}
    for T in (32 * world, 96 * world):
        batch = make_batch("plain", 1, T, 128, torch.Generator().manual_seed(SEED + T))
        comm_stats(model).reset()
        model(**sp.shard_batch(batch)).loss.backward()
        out[str(T)] = {"per_layer": comm_stats(model).per_layer(),
                       "calls": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in comm_stats(model).calls().items()}}
    sp.unprepare_model(model)
    out["restored"] = not any("forward" in m.__dict__ for m in model.modules())
    return out


def errors() -> dict:
    """Messages of the errors that need a process group (every rank must raise, none may hang)."""
    import torch.distributed as dist
    import transformers

    from longkit.deepspeed_ext import SequenceParallel, SequenceParallelConfig

    world = dist.get_world_size()
    got = {}

    def attempt(key, fn):
        try:
            fn()
            got[key] = "no error"
        except Exception as e:  # noqa: BLE001
            got[key] = f"{type(e).__name__}: {e}"

    torch.manual_seed(0)
    lasp = SequenceParallel(SequenceParallelConfig(mode="lasp2", size=world))
    model = tiny_linear_model("minimax")
    lasp.prepare_model(model)
    packed = make_batch("packed", 1, 16 * world, 128, torch.Generator().manual_seed(0))
    attempt("packed", lambda: model(**lasp.shard_batch(packed)))
    attempt("no_position_ids", lambda: model(input_ids=torch.randint(0, 128, (1, 8)), use_cache=False))
    attempt("cache", lambda: model(**{**lasp.shard_batch(make_batch("plain", 1, 8 * world, 128,
                                                                    torch.Generator().manual_seed(0))),
                                      "use_cache": True}))
    attempt("router_logits", lambda: model(**lasp.shard_batch(packed), output_router_logits=True))
    lasp.unprepare_model(model)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    # "auto" on a softmax-only model: Ulysses, and it matches one process.
    auto = SequenceParallel(SequenceParallelConfig(mode="auto", size=world))
    batch = make_batch("plain", 1, 8 * world, 128, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = float(llama(**batch, use_cache=False).loss)
    auto.prepare_model(llama)
    got["auto_llama"] = {"ref": ref, "sp": float(llama(**auto.shard_batch(batch)).loss.detach()),
                         "mode": llama.config._attn_implementation}
    return got


def main() -> None:
    import torch.distributed as dist

    out_path, names = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    special = {"ops": lambda: ops((rank, world)), "bytes": bytes_vs_length, "errors": errors,
               "broken_state": lambda: run_model("qwen3_next", broken="no_state"),
               "broken_halo": lambda: run_model("qwen3_next", broken="no_halo"),
               "broken_state_kimi": lambda: run_model("kimi_linear", broken="no_state")}
    results = {}
    for name in names:
        try:
            results[name] = special[name]() if name in special else run_model(name)
        except Exception as e:  # reported per scenario so one failure does not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
