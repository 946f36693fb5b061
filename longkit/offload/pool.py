"""Host buffers for offloaded tensors: allocated once, reused across steps.

A buffer is a flat 1-D host tensor keyed by ``(device, dtype, numel)``: a tensor of any shape with that many
elements is copied into a strided view of it. Buffers go back to the pool when autograd frees the last saved
tensor that used them, so from the second training step on (same shapes) no buffer is allocated.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import torch

__all__ = ["HostBufferPool"]

PoolKey = tuple[str, torch.dtype, int]


class HostBufferPool:
    """Free lists of host buffers keyed by ``(device, dtype, numel)``; ``pin_memory`` page-locks new ones.

    Every buffer taken with :meth:`acquire` must come back through :meth:`release`. Copies into and out of
    pooled buffers of one device must run on one stream (the offloader's copy stream), so that a buffer
    handed out again is only written after its previous copies have finished.
    """

    def __init__(self, pin_memory: bool):
        self.pin_memory = bool(pin_memory)
        self._free: dict[PoolKey, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()  # released from autograd's backward thread, taken in the forward thread
        self.buffers = 0  # buffers owned by the pool (free or in use)
        self.bytes = 0
        self.in_use_bytes = 0
        self.peak_bytes = 0
        self.peak_in_use_bytes = 0
        self.allocations = 0  # buffers ever allocated

    def acquire(self, device: str, dtype: torch.dtype, numel: int) -> tuple[PoolKey, torch.Tensor]:
        """A free buffer of ``numel`` elements of ``dtype`` (allocated if none is free) and its key."""
        key = (device, dtype, numel)
        with self._lock:
            free = self._free.get(key)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(numel, dtype=dtype, pin_memory=self.pin_memory)
            with self._lock:
                self.buffers += 1
                self.allocations += 1
                self.bytes += buf.nbytes
                self.peak_bytes = max(self.peak_bytes, self.bytes)
        with self._lock:
            self.in_use_bytes += buf.nbytes
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        return key, buf

    def release(self, key: PoolKey, buf: torch.Tensor) -> None:
        """Give a buffer from :meth:`acquire` back."""
        with self._lock:
            self.in_use_bytes -= buf.nbytes
            self._free[key].append(buf)

    def clear(self) -> int:
        """Free every idle buffer (buffers still in use stay until released, then are kept); returns bytes freed."""
        with self._lock:
            freed = sum(b.nbytes for bufs in self._free.values() for b in bufs)
            self.buffers -= sum(len(bufs) for bufs in self._free.values())
            self.bytes -= freed
            self._free.clear()
        return freed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"pool_buffers": self.buffers, "pool_bytes": self.bytes, "pool_bytes_in_use": self.in_use_bytes,
                    "peak_pool_bytes": self.peak_bytes, "peak_pool_bytes_in_use": self.peak_in_use_bytes,
                    "buffers_allocated": self.allocations, "pinned": self.pin_memory}
