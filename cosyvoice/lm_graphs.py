"""The LM's decode step with fixed shapes, captured as CUDA graphs.

A decode step of the LM stage feeds one row for each of its requests.  Eager, a Qwen2-0.5B step
is some 400 small kernels, and on a GPU their launches from Python, not the GPU's work, bound it.
A CUDA graph replays all of them with one launch, but it replays fixed shapes on fixed buffers,
so the step is made static (the gpt-fast recipe, with the pool's slot as the batch index):

- the batch is padded to a bucket (1, 2, 4, 8, ... up to the pool's slots); padding rows feed
  zeros and write their keys into the pool's spare slot, which no request ever holds;
- each request reads its slot's keys up to a multiple of ``key_block`` rows, masked past its own
  length, instead of up to the longest request's;
- the embedding lookup stays outside (rows of any kind), and so does sampling.

One graph per (bucket, key length): 6 x 8 of them for 32 slots of 2048 rows, all recorded by
:meth:`DecodeGraphs.capture_all` (the model's warm-up, before a server takes requests: recording
synchronises the device), sharing one memory pool and one stream (they replay one at a time, in
the LM stage's thread, and each output is copied out at once).  A step with no recorded graph
runs the same function eagerly.  Where there is no
CUDA the same fixed-shape function runs eagerly, which is what the tests compare with
:meth:`~cosyvoice.llm.Qwen2LM.step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import to_device
from .kv_cache import KVCache, KVPool
from .llm import Qwen2LM, _Decoding

__all__ = ["DecodeGraphs", "GraphCaptureFailed", "buckets", "fixed_attention", "record_graph"]


class GraphCaptureFailed(RuntimeError):
    """A decode step could not be recorded as a CUDA graph (a driver or kernel that cannot be
    captured): the server should not start with graphs on."""


@dataclass
class _Inputs:
    """One bucket's static inputs: what a replay reads."""

    xs: torch.Tensor  # [B, D] input embeddings
    slots: torch.Tensor  # [B] long: each row's slot (the spare for padding)
    positions: torch.Tensor  # [B] long: each row's position (its cache length)


class DecodeGraphs:
    """Fixed-shape decode steps over the slots of ``pool`` (which needs a spare slot)."""

    def __init__(self, lm: Qwen2LM, pool: KVPool, key_block: int = 256, capture: bool | None = None) -> None:
        """``capture``: record CUDA graphs (default: when the LM is on a CUDA device); without,
        the fixed-shape step runs eagerly."""
        if pool.spare is None:
            raise ValueError("fixed-shape decode steps need a KV pool with a spare slot")
        if key_block < 1:
            raise ValueError("key_block must be at least 1")
        self.lm, self.pool, self.key_block = lm, pool, key_block
        self.device = lm.speech_embedding.weight.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the LM on a CUDA device")
        self.buckets = buckets(pool.slots)
        dim, dtype = lm.speech_embedding.weight.shape[1], lm.speech_embedding.weight.dtype
        self._inputs = {
            b: _Inputs(
                torch.zeros(b, dim, dtype=dtype, device=self.device),
                torch.full((b,), pool.spare, dtype=torch.long, device=self.device),
                torch.zeros(b, dtype=torch.long, device=self.device),
            )
            for b in self.buckets
        }
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self._stream = torch.cuda.Stream(self.device) if self.capture else None  # every recording's
        self.steps = 0  # steps run at fixed shapes
        self.replays = 0  # of which replayed as CUDA graphs

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def key_length(self, rows: int) -> int:
        """Keys read by a step whose longest request holds ``rows`` rows (the new one included)."""
        return min(-(-rows // self.key_block) * self.key_block, self.pool.max_len)

    def takes(self, caches: Sequence[KVCache], counts: Sequence[int]) -> bool:
        """Whether a step of these requests is a decode step of this pool that fits a bucket."""
        return (
            0 < len(caches) <= self.buckets[-1]
            and all(n == 1 for n in counts)
            and all(c.pool is self.pool and c.slot is not None for c in caches)
        )

    def __call__(self, xs: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        """Feed row ``xs[r]`` [n, D] through ``caches[r]``; float32 logits [n, V] (as
        :meth:`Qwen2LM.step`).  Raises :class:`~cosyvoice.kv_cache.CacheFull` for a full slot."""
        n = len(caches)
        for cache in caches:
            cache.reserve(1)
        positions = [c.length for c in caches]
        size, keys = self.bucket(n), self.key_length(max(positions) + 1)
        inputs = self._inputs[size]
        graph = self._graphs.get((size, keys))  # None: not recorded (no CUDA): the same step, eager
        pad = size - n
        index = to_device(
            [[c.slot for c in caches] + [self.pool.spare] * pad, positions + [0] * pad], self.device
        )
        inputs.slots.copy_(index[0])
        inputs.positions.copy_(index[1])
        inputs.xs[:n].copy_(xs)
        inputs.xs[n:].zero_()
        if graph is None:
            logits = self._step(inputs, keys)
        else:
            graph[0].replay()
            logits = graph[1]
            self.replays += 1
        for cache in caches:
            cache.length += 1
        self.steps += 1
        return logits[:n].clone()

    def capture_all(self) -> int:
        """Record every (bucket, key length) graph (the model's warm-up does, before a server
        takes requests: recording synchronises the device); returns how many exist (0 without
        CUDA).  Raises :class:`GraphCaptureFailed` when one cannot be recorded."""
        if not self.capture:
            return 0
        lengths = sorted(
            {
                min(k, self.pool.max_len)
                for k in range(self.key_block, self.pool.max_len + self.key_block, self.key_block)
            }
        )
        for size in reversed(self.buckets):  # the largest first: the shared pool then fits the rest
            for keys in reversed(lengths):
                if (size, keys) not in self._graphs:
                    try:
                        self._record(size, keys)
                    except RuntimeError as e:
                        raise GraphCaptureFailed(
                            f"recording the LM decode step as a CUDA graph failed ({e}); "
                            "run without CUDA graphs (realtime serve --cuda-graphs off)"
                        ) from e
        return len(self._graphs)

    def _step(self, inputs: _Inputs, keys: int) -> torch.Tensor:
        """The fixed-shape step: logits [B, V] of the bucket's rows, reading ``keys`` rows per slot."""
        lm = self.lm
        bb = lm.backbone
        h = inputs.xs.unsqueeze(0)
        cos, sin = bb.rotary_emb(h, inputs.positions.unsqueeze(0))
        visible = torch.arange(keys, device=self.device)[None, :] <= inputs.positions[:, None]
        rows = torch.arange(len(inputs.xs), device=self.device)
        decoding = _Decoding(
            self.pool, [], rows, inputs.slots, inputs.positions, keys, visible[:, None, None, :]
        )
        with fixed_attention():
            for i in range(len(bb.layers)):
                h = lm.layer(i, h, cos, sin, decoding.attend)
        return lm.llm_decoder(bb.norm(h)[0]).float()

    def _record(self, size: int, keys: int) -> None:
        """Record the graph of (bucket, key length), its inputs set to padding (every write goes
        to the spare slot)."""
        inputs = self._inputs[size]
        inputs.slots.fill_(self.pool.spare)
        inputs.positions.zero_()
        inputs.xs.zero_()
        self._graphs[(size, keys)] = record_graph(
            lambda: self._step(inputs, keys), self.device, self._stream, self._mempool
        )


def fixed_attention() -> contextlib.AbstractContextManager:
    """The attention kernels a recorded step may use: not cuDNN's, which some torch versions
    choose first on Hopper GPUs and whose boolean-mask path copied from the host (illegal while
    recording: pytorch#139450), so that what is recorded does not depend on the version."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def buckets(limit: int) -> list[int]:
    """Batch sizes a fixed-shape step is padded to: powers of two, and ``limit`` itself."""
    return sorted({min(2**i, limit) for i in range(limit.bit_length() + 1)})


def record_graph(
    fn: Callable[[], torch.Tensor], device: torch.device, stream: torch.cuda.Stream, pool: tuple
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn`` recorded as a CUDA graph, and its output (what each replay overwrites).  Two runs
    first, so that kernels are chosen and workspaces allocated before recording; everything on
    ``stream``, a stream of ``device`` (a capture on another device's stream would record
    nothing), in the shared memory ``pool``."""
    with torch.cuda.device(device), torch.inference_mode():
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = fn()
    return graph, out
