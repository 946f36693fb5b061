"""DeepSpeed extension: a ``"longkit"`` section in the DeepSpeed JSON config and Ulysses sequence parallelism
for Hugging Face models.

    from longkit.deepspeed_ext import initialize
    engine, optimizer, loader, scheduler, sp = initialize(model, "ds_config.json", training_data=dataset,
                                                          collate_fn=collate, model_parameters=model.parameters())
    for shard in loader:
        loss = engine(**shard).loss      # the whole batch's loss, identical on every rank of the group
        engine.backward(loss)
        engine.step()

Built: Ulysses (all-to-all) sequence parallelism with GQA, uneven head counts, any sequence length
(padded), packed documents and padding; ZeRO 0-3; bf16; per-layer activation offload to pinned host memory
(``"activation_offload": {...}``, :mod:`longkit.offload`), alone or with Ulysses, with or without gradient
checkpointing. LASP-2 / LASP-2H (``mode: "lasp2"`` or ``"auto"``) for the linear-attention layers of MiniMax,
Qwen3-Next and Qwen3.5 (:mod:`longkit.deepspeed_ext.lasp2`; the softmax layers of these hybrids go through
Ulysses in the same group).
"""

from .config import ActivationOffloadConfig, LongkitDSConfig, SequenceParallelConfig, parse_ds_config
from .engine import LongkitEngine, initialize
from .groups import SequenceParallelGroups
from .sequence_parallel import SequenceParallel, reduce_loss

__all__ = [
    "initialize",
    "LongkitEngine",
    "SequenceParallel",
    "SequenceParallelGroups",
    "SequenceParallelConfig",
    "ActivationOffloadConfig",
    "LongkitDSConfig",
    "parse_ds_config",
    "reduce_loss",
]
