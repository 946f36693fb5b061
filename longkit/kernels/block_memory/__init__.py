"""Block memory (InfLLM-style retrieval): representative keys, block scoring, top-k, gather, and the attention rule.

All in :mod:`.naive`: plain batched PyTorch ops that run as they are on a CUDA device (``torch.topk`` and an indexed
gather stay on the device, so selection needs no host synchronisation); no Triton kernel is needed for them. The
attention itself runs in the shared kernel (:func:`longkit.kernels.masked_attention`) on CUDA, with the selected
blocks gathered into one contiguous buffer; :func:`naive_memory_attention` is its reference.
"""

from .naive import (
    block_representatives,
    gather_blocks,
    naive_memory_attention,
    received_attention,
    score_blocks,
    select_blocks,
    sink_scores,
)

__all__ = [
    "received_attention",
    "sink_scores",
    "block_representatives",
    "score_blocks",
    "select_blocks",
    "gather_blocks",
    "naive_memory_attention",
]
