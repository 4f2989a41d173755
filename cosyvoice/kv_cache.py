"""Keys and values of the speech LM, per request: a slot of a preallocated pool, or a buffer of its
own that grows (a request run alone, outside any scheduler).

Layout per layer: ``[capacity, kv_heads, head_dim]``, rows written at the request's length, so
attention reads a prefix view and nothing is copied or reallocated while a pooled request decodes
(the gpt-fast layout with the slot as the batch index).  A pool is sized from a memory budget;
admission counts its free slots.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

__all__ = ["CacheFull", "KVCache", "KVPool", "KVShape"]


class CacheFull(Exception):
    """A pooled request reached its slot's capacity (it ends as if capped)."""


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    def bytes_per_row(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class KVCache:
    """One request's keys and values (``keys[layer]`` / ``values[layer]``: [capacity, kv_heads, d])."""

    def __init__(
        self,
        shape: KVShape,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        growable: bool,
        slot: int | None = None,
        pool: KVPool | None = None,
    ) -> None:
        self.shape = shape
        self.keys = keys
        self.values = values
        self.growable = growable
        self.slot = slot
        self.pool = pool  # the pool a slot belongs to (its rows are ``pool.keys[layer][slot]``)
        self.length = 0

    @classmethod
    def own(cls, shape: KVShape, capacity: int = 256) -> KVCache:
        """A cache of its own that grows as needed (amortised doubling)."""

        def alloc() -> list[torch.Tensor]:
            return [
                torch.empty(capacity, shape.kv_heads, shape.head_dim, dtype=shape.dtype, device=shape.device)
                for _ in range(shape.layers)
            ]

        return cls(shape, alloc(), alloc(), growable=True)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[0]

    def reserve(self, n: int) -> None:
        """Room for ``n`` more rows; raises :class:`CacheFull` for a pool slot that has none."""
        need = self.length + n
        if need <= self.capacity:
            return
        if not self.growable:
            raise CacheFull(f"KV slot holds {self.capacity} rows; {need} needed")
        size = max(need, 2 * self.capacity)
        for table in (self.keys, self.values):
            for i, old in enumerate(table):
                new = old.new_empty(size, *old.shape[1:])
                new[: self.length] = old[: self.length]
                table[i] = new


class KVPool:
    """``slots`` caches of ``max_len`` rows each, allocated once.  Thread-safe acquire/release.

    With ``spare``, one more slot that is never handed out (index ``slots``): the padding rows of
    a fixed-shape decode step write their keys there (:class:`~cosyvoice.lm_graphs.DecodeGraphs`)."""

    def __init__(self, shape: KVShape, slots: int, max_len: int, spare: bool = False) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError("a KV pool needs at least one slot of at least one row")
        self.shape = shape
        self.slots = slots
        self.max_len = max_len
        self.spare = slots if spare else None
        size = (slots + spare, max_len, shape.kv_heads, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=shape.device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=shape.device) for _ in range(shape.layers)]
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    @classmethod
    def for_budget(
        cls,
        shape: KVShape,
        budget_bytes: int,
        max_len: int,
        min_slots: int = 1,
        max_slots: int | None = None,
        spare: bool = False,
    ) -> KVPool:
        """As many slots of ``max_len`` rows as ``budget_bytes`` holds (the spare included), at
        least ``min_slots`` and at most ``max_slots``."""
        slots = max(min_slots, budget_bytes // (shape.bytes_per_row() * max_len) - spare)
        return cls(shape, slots if max_slots is None else min(max_slots, slots), max_len, spare)

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> KVCache | None:
        """A free slot as an empty cache, or None when all are taken."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        return KVCache(
            self.shape,
            [k[slot] for k in self.keys],
            [v[slot] for v in self.values],
            growable=False,
            slot=slot,
            pool=self,
        )

    def release(self, cache: KVCache) -> None:
        if cache.slot is None:
            return
        with self._lock:
            if cache.slot not in self._free:
                self._free.append(cache.slot)
        cache.slot = None
        cache.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
