"""The flow-matching vector field of CosyVoice2: a causal 1-D U-Net with transformer blocks.

Submodule names follow the official `CausalConditionalDecoder` so that `flow.pt`'s
`decoder.estimator.*` tensors load unchanged.

Two ways to run it:
- `forward` evaluates whole sequences (what the official solver does every chunk);
- `forward_chunk` evaluates only new frames against an `EstimatorCache`. In streaming mode every
  layer is causal at chunk granularity (left-padded convolutions, block-causal attention with 50-frame
  chunks), so frames of a finished chunk never change when more frames arrive; the cache keeps what
  later frames still need: the last k-1 inputs of every convolution and the attention keys/values of
  every transformer block.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import to_device


@dataclass
class EstimatorConfig:
    in_channels: int = 320  # x, mu, spks, cond: 4 x 80
    out_channels: int = 80
    channels: tuple[int, ...] = (256,)
    attention_head_dim: int = 64
    num_heads: int = 8
    n_blocks: int = 4
    num_mid_blocks: int = 12
    act_fn: str = "gelu"
    static_chunk_size: int = 50
    num_decoding_left_chunks: int = -1

    @classmethod
    def from_dict(cls, d: dict) -> EstimatorConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "channels" in kwargs:
            kwargs["channels"] = tuple(kwargs["channels"])
        return cls(**kwargs)


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int, scale: float = 1000.0):
        super().__init__()
        self.dim = dim
        self.scale = scale

    def forward(self, t: Tensor) -> Tensor:  # [B] -> [B, dim]
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        angle = self.scale * t.unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat([angle.sin(), angle.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class KVBuffer:
    """Keys and values of one attention layer, [B, H, capacity, D] with a live window [start, end).

    Appending writes in place (amortised growth) instead of concatenating, so a chunk costs O(new
    frames) to store and not a copy of everything cached; dropping old keys only moves `start`."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype  # storage dtype (None: as computed); reads are cast back to the query's
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.start = 0
        self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add [B, H, n, D] keys/values; return views of every live key/value (old + new)."""
        n = k.shape[2]
        # a buffer made under torch.inference_mode cannot be written outside it: copy it out once
        stale = self.k is not None and self.k.is_inference() and not torch.is_inference_mode_enabled()
        if self.k is None or stale or self.end + n > self.k.shape[2]:
            live = self.length
            capacity = live + n + max((live + n) // 4, 100)
            dtype = self.dtype or k.dtype
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3], dtype=dtype)
            new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3], dtype=dtype)
            if live:
                new_k[:, :, :live] = self.k[:, :, self.start : self.end]
                new_v[:, :, :live] = self.v[:, :, self.start : self.end]
            self.k, self.v, self.start, self.end = new_k, new_v, 0, live
        self.k[:, :, self.end : self.end + n] = k
        self.v[:, :, self.end : self.end + n] = v
        self.end += n
        keys, values = self.k[:, :, self.start : self.end], self.v[:, :, self.start : self.end]
        return keys.to(k.dtype), values.to(v.dtype)

    def drop_front(self, count: int) -> None:
        self.start = min(self.start + count, self.end)

    def clone(self) -> KVBuffer:
        """An independent copy of the live window (appends to either leave the other as is)."""
        copy = KVBuffer(self.dtype)
        if self.k is not None:
            copy.k = self.k[:, :, self.start : self.end].clone()
            copy.v = self.v[:, :, self.start : self.end].clone()
            copy.end = self.length
        return copy

    def nbytes(self) -> int:
        """Allocated bytes (capacity included)."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def live_nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.length * self.k[:, :, :1].numel() * self.k.element_size()


class EstimatorCache:
    """Per-request state of one estimator evaluation sequence (one Euler step of one stream).

    `frames` counts the frames already evaluated; `kv_start` is the absolute frame index of the first
    cached key (it moves forward only when `left_chunks` limits the attention window). `kv_dtype`
    (e.g. torch.float16) stores keys/values at lower precision to halve the memory, at the cost of
    exactness; None keeps the compute dtype."""

    def __init__(self, left_chunks: int | None = None, kv_dtype: torch.dtype | None = None):
        if left_chunks is not None and left_chunks < 0:
            raise ValueError("left_chunks must be >= 0 or None (unbounded)")
        self.left_chunks = left_chunks
        self.kv_dtype = kv_dtype
        self.frames = 0
        self.kv_start = 0
        self.closed = False
        self.conv: dict[nn.Module, Tensor] = {}
        self.kv: dict[nn.Module, KVBuffer] = {}

    def nbytes(self) -> int:
        """Allocated bytes of every cached tensor."""
        return sum(t.numel() * t.element_size() for t in self.conv.values()) + sum(
            b.nbytes() for b in self.kv.values()
        )

    def live_nbytes(self) -> int:
        """Bytes actually in use (what a tight allocator would hold)."""
        total = sum(t.numel() * t.element_size() for t in self.conv.values())
        return total + sum(b.live_nbytes() for b in self.kv.values())

    def clear(self) -> None:
        self.conv.clear()
        self.kv.clear()
        self.closed = True

    def clone(self) -> EstimatorCache:
        """An independent copy (see :meth:`EncoderCache.clone`)."""
        if self.closed:
            raise RuntimeError("cannot copy a closed estimator cache")
        copy = EstimatorCache(self.left_chunks, self.kv_dtype)
        copy.frames, copy.kv_start = self.frames, self.kv_start
        copy.conv = {module: t.clone() for module, t in self.conv.items()}
        copy.kv = {module: b.clone() for module, b in self.kv.items()}
        return copy


class CacheGroup(list):
    """The caches of several streams evaluated in one call: the batch holds each stream's rows in
    turn (``x.shape[0] // len(group)`` rows each: the two CFG rows of one stream).  Every layer
    that keeps state reads and writes each stream's own slice; attention runs per stream over its
    own keys, everything else runs on the whole batch."""

    def rows(self, batch: int) -> int:
        if batch % len(self):
            raise ValueError(f"a batch of {batch} rows does not split over {len(self)} caches")
        return batch // len(self)


def _group(cache: EstimatorCache | CacheGroup) -> CacheGroup:
    return cache if isinstance(cache, CacheGroup) else CacheGroup([cache])


def state_widths(estimator: CausalConditionalDecoder) -> tuple[int, int]:
    """What one frame of one CFG row costs the estimator's state per Euler step, in elements:
    the key width summed over its attention layers (values take as much again), and the
    convolutions' kept inputs (channels x (kernel - 1), whatever the frames)."""
    keys = sum(m.to_k.out_features for m in estimator.modules() if isinstance(m, Attention))
    conv = sum(m.in_channels * m.context for m in estimator.modules() if isinstance(m, CausalConv1d))
    return keys, conv


class EstimatorSlots:
    """Every stream's estimator state in tensors allocated once, a slot per stream (and a spare
    that no stream holds: the padding rows of a fixed-shape round write there).

    For each Euler step: per attention layer a ring of ``left_chunks + 1`` chunks of keys and
    values, [slots + 1, 2 CFG rows, heads, ring frames, head dim], and per convolution its last
    inputs, [slots + 1, 2, channels, k - 1].  A stream's chunk ``c`` is written to ring chunk
    ``c % (left_chunks + 1)``, so the ring holds exactly the chunks the window lets chunk ``c``
    see.  The estimator's attention has no positional term and, one chunk per call, every key
    in the window is visible to every query, so attending to the ring in its rotated order, with
    a mask of what is written, gives the same output as the per-stream buffers (to float
    round-off).  A round of many streams then reads and writes its state with one gather and one
    scatter per layer instead of a few small operations per stream: a GPU's launches stop
    growing with the streams, and the shapes are fixed (what a CUDA graph needs)."""

    def __init__(
        self,
        estimator: CausalConditionalDecoder,
        steps: int,
        slots: int,
        left_chunks: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if slots < 1 or left_chunks < 0:
            raise ValueError("estimator slots need at least one slot and a window of 0 chunks or more")
        weight = estimator.final_proj.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.chunk = estimator.cfg.static_chunk_size
        self.left_chunks = left_chunks
        self.ring = (left_chunks + 1) * self.chunk
        self.slots, self.spare = slots, slots
        attentions = [m for m in estimator.modules() if isinstance(m, Attention)]
        convs = [m for m in estimator.modules() if isinstance(m, CausalConv1d)]

        def kv(m: Attention) -> Tensor:
            d = m.to_k.out_features // m.heads
            return torch.zeros(slots + 1, 2, m.heads, self.ring, d, dtype=dtype, device=device)

        self.keys = [{m: kv(m) for m in attentions} for _ in range(steps)]
        self.values = [{m: kv(m) for m in attentions} for _ in range(steps)]
        self.conv = [
            {
                m: torch.zeros(slots + 1, 2, m.in_channels, m.context, dtype=weight.dtype, device=device)
                for m in convs
            }
            for _ in range(steps)
        ]
        self.slot_bytes = self.slot_nbytes(estimator, steps, left_chunks, self.elem)
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()
        self.graphs = None  # a FlowGraphs of these slots, when rounds run at fixed shapes

    @staticmethod
    def slot_nbytes(estimator: CausalConditionalDecoder, steps: int, left_chunks: int, elem: int = 4) -> int:
        """Bytes of one slot (what a stream holds of the estimator's state)."""
        ring = (left_chunks + 1) * estimator.cfg.static_chunk_size
        keys, conv = state_widths(estimator)
        return steps * 2 * elem * (2 * keys * ring + conv)

    def nbytes(self) -> int:
        tables = [t for step in self.keys + self.values + self.conv for t in step.values()]
        return sum(t.numel() * t.element_size() for t in tables)

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """A free slot with cleared convolution state (keys need no clearing: they are masked
        until written), or None when all are taken."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        for step in self.conv:
            for t in step.values():
                t[slot].zero_()
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._free and slot != self.spare:
                self._free.append(slot)

    def snapshot(self, slot: int, frames: int) -> list[list[Tensor]]:
        """A copy of one slot's state after ``frames`` frames (per Euler step: keys, values and
        convolution tensors); of the rings only what holds keys (a short prompt's state is
        small)."""
        used = min(-(-frames // self.chunk), self.left_chunks + 1) * self.chunk
        return [
            [t[slot, :, :, :used].clone() for t in (*k.values(), *v.values())]
            + [t[slot].clone() for t in c.values()]
            for k, v, c in zip(self.keys, self.values, self.conv, strict=True)
        ]

    def load(self, slot: int, state: list[list[Tensor]]) -> None:
        """Write a :meth:`snapshot` into ``slot``."""
        for k, v, c, saved in zip(self.keys, self.values, self.conv, state, strict=True):
            for t, s in zip((*k.values(), *v.values()), saved, strict=False):
                t[slot, :, :, : s.shape[2]].copy_(s)
            for t, s in zip(c.values(), saved[2 * len(k) :], strict=True):
                t[slot].copy_(s)

    def batch(self, slots: list[int], frames: list[int], n: int, pad_to: int | None = None) -> SlotBatch:
        """The round of streams in ``slots`` whose estimators have evaluated ``frames`` frames
        each (on chunk boundaries) and now evaluate ``n`` more (at most a chunk), padded with
        the spare slot to ``pad_to`` streams."""
        if not 0 < n <= self.chunk or any(f % self.chunk for f in frames):
            raise ValueError("a slot round evaluates at most one chunk per stream, from a chunk boundary")
        rows = max(pad_to or 0, len(slots))
        slot_of = torch.tensor(list(slots) + [self.spare] * (rows - len(slots)))
        chunk_of = torch.tensor([f // self.chunk for f in frames] + [0] * (rows - len(slots)))
        ring_chunks = self.left_chunks + 1
        # chunk c is in ring chunk c % ring_chunks: until every stream has filled its ring, only
        # a prefix holds keys, and an unpadded batch reads just that (a stream's first chunks
        # then cost what they cost with buffers of its own); a padded one reads the whole ring
        used = ring_chunks if pad_to is not None else min(int(chunk_of.max()) + 1 if rows else 1, ring_chunks)
        at = torch.arange(used * self.chunk)
        # ring chunk j holds chunk c - ((c - j) mod ring_chunks): visible if that chunk exists and
        # is in the window (earlier chunks: whole; the current one: its first n frames)
        back = (chunk_of[:, None] - at[None, :] // self.chunk) % ring_chunks  # [rows, ring]
        visible = (back <= chunk_of[:, None]) & ((back > 0) | (at[None, :] % self.chunk < n))
        pos = (chunk_of % ring_chunks)[:, None] * self.chunk + torch.arange(n)[None, :]
        device = next(iter(self.conv[0].values())).device
        return SlotBatch(  # no host sync: the stream runs ahead of the host
            self,
            to_device(slot_of, device),
            to_device(pos, device),
            to_device(visible.repeat_interleave(2, dim=0)[:, None, None, :], device),
        )


class SlotBatch:
    """The streams of one round in :class:`EstimatorSlots`: their slots [B], the ring positions
    their new frames are written to [B, n], and what each may attend to [2B, 1, 1, ring] (or the
    prefix of the ring that holds keys yet).
    ``step`` selects the Euler step's tables (set before each estimator call)."""

    def __init__(self, store: EstimatorSlots, slots: Tensor, pos: Tensor, visible: Tensor) -> None:
        self.store, self.slots, self.pos, self.visible = store, slots, pos, visible
        self.step = 0

    def __len__(self) -> int:
        return len(self.slots)

    def at_step(self, step: int) -> SlotBatch:
        """This batch, reading and writing Euler step ``step``'s tables."""
        self.step = step
        return self

    def conv_input(self, module: CausalConv1d, x: Tensor) -> Tensor:
        """``x`` [2B, C, n] after each stream's last inputs of ``module``, which it replaces."""
        table = self.store.conv[self.step][module]
        past = table.index_select(0, self.slots).flatten(0, 1)
        x = torch.cat([past.to(x.dtype), x], dim=2)
        table.index_copy_(
            0, self.slots, x[:, :, x.shape[2] - module.context :].unflatten(0, (-1, 2)).to(table.dtype)
        )
        return x

    def attend(self, module: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write the new keys/values [2B, H, n, d] into the rings, attend to what is visible."""
        out = []
        read = self.visible.shape[-1]  # the ring, or the prefix of it that holds keys yet
        for table, new in (
            (self.store.keys[self.step][module], k),
            (self.store.values[self.step][module], v),
        ):
            table[self.slots[:, None], :, :, self.pos] = (
                new.unflatten(0, (-1, 2)).permute(0, 3, 1, 2, 4).to(table.dtype)
            )
            out.append(table[:, :, :, :read].index_select(0, self.slots).flatten(0, 1).to(q.dtype))
        return F.scaled_dot_product_attention(q, out[0], out[1], attn_mask=self.visible)


class CausalConv1d(nn.Conv1d):
    """Conv1d that sees only the current and earlier frames (left padding of k-1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.context = kernel_size - 1

    def forward(self, x: Tensor, cache: EstimatorCache | CacheGroup | None = None) -> Tensor:  # [B, C, T]
        if cache is None:
            return super().forward(F.pad(x, (self.context, 0)))
        if isinstance(cache, SlotBatch):
            return super().forward(cache.conv_input(self, x))
        group = _group(cache)
        rows = group.rows(x.shape[0])
        pasts = [c.conv.get(self) for c in group]
        pasts = [p if p is not None else x.new_zeros(rows, x.shape[1], self.context) for p in pasts]
        x = torch.cat([pasts[0] if len(pasts) == 1 else torch.cat(pasts), x], dim=2)
        tail = x[:, :, x.shape[2] - self.context :]
        for i, c in enumerate(group):  # a copy: a view would keep the whole input alive
            c.conv[self] = tail[i * rows : (i + 1) * rows].clone()
        return super().forward(x)


class Mish(nn.Module):
    """x * tanh(softplus(x)) as x * n / (n + 2) with n = e^x (e^x + 2): one exp instead of exp, log1p
    and tanh, 2.3x faster on a CPU (a tenth of a TINY flow round was Mish) and within 1e-6 of
    ``F.mish``.  Above 20, where tanh(softplus(x)) is 1 in float32, e^x is clamped so that n stays
    finite."""

    def forward(self, x: Tensor) -> Tensor:
        n = torch.exp(x.clamp(max=20.0))
        n.mul_(n + 2)
        return n.div_(n + 2).mul_(x)


class Transpose(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class CausalBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        # indices match the checkpoint: conv at block.0, LayerNorm at block.2
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3), Transpose(), nn.LayerNorm(dim_out), Transpose(), Mish()
        )

    def forward(self, x: Tensor, mask: Tensor | None, cache: EstimatorCache | None = None) -> Tensor:
        if mask is not None:
            x = x * mask
        conv, _, norm, _, act = self.block
        y = act(norm(conv(x, cache).transpose(1, 2)).transpose(1, 2))
        return y if mask is None else y * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(
        self, x: Tensor, mask: Tensor | None, t_emb: Tensor, cache: EstimatorCache | None = None
    ) -> Tensor:
        h = self.block1(x, mask, cache)
        h = h + self.mlp(t_emb).unsqueeze(-1)
        h = self.block2(h, mask, cache)
        return h + self.res_conv(x if mask is None else x * mask)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def _split(self, x: Tensor) -> Tensor:  # [B, T, H*D] -> [B, H, T, D]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        bias: Tensor | list | None,
        cache: EstimatorCache | CacheGroup | None = None,
        keep_from: int | list[int] = 0,
    ) -> Tensor:
        """bias: None (everything visible) or additive [B or 1, 1, T_q, T_k] (0 allowed, -1e10 not).
        With a cache, keys/values of the new frames are appended after the cached ones; `keep_from`
        is how many of the combined keys the cache may drop afterwards (they fall out of every later
        query's window).  With a :class:`CacheGroup`, ``bias`` and ``keep_from`` are lists, one per
        stream, and each stream attends to its own keys."""
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(x)), self._split(self.to_v(x))
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.to_out[0](out.transpose(1, 2).flatten(2))
        if isinstance(cache, SlotBatch):
            return self.to_out[0](cache.attend(self, q, k, v).transpose(1, 2).flatten(2))
        group = _group(cache)
        rows = group.rows(q.shape[0])
        biases = bias if isinstance(bias, list) else [bias] * len(group)
        keeps = keep_from if isinstance(keep_from, list) else [keep_from] * len(group)
        outs = []
        for i, c in enumerate(group):
            part = slice(i * rows, (i + 1) * rows)
            buf = c.kv.get(self)
            if buf is None:
                buf = c.kv[self] = KVBuffer(c.kv_dtype)
            keys, values = buf.append(k[part], v[part])
            outs.append(F.scaled_dot_product_attention(q[part], keys, values, attn_mask=biases[i]))
            if keeps[i]:
                buf.drop_front(keeps[i])
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GELU(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, act_fn: str = "gelu"):
        super().__init__()
        if act_fn != "gelu":
            raise ValueError(f"unsupported act_fn {act_fn!r} (CosyVoice2 uses exact gelu)")
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: Tensor,
        bias: Tensor | list | None,
        cache: EstimatorCache | CacheGroup | None = None,
        keep_from: int | list[int] = 0,
    ) -> Tensor:
        x = x + self.attn1(self.norm1(x), bias, cache, keep_from)
        return x + self.ff(self.norm3(x))


def chunk_allowed(q_pos: Tensor, k_pos: Tensor, chunk: int, left_chunks: int | None) -> Tensor:
    """[Tq, Tk] bool: a query sees every key up to the end of its own chunk (and, with a window,
    only `left_chunks` chunks before its own)."""
    q_chunk = torch.div(q_pos, chunk, rounding_mode="floor").unsqueeze(1)
    allowed = k_pos.unsqueeze(0) < (q_chunk + 1) * chunk
    if left_chunks is not None and left_chunks >= 0:
        allowed &= k_pos.unsqueeze(0) >= (q_chunk - left_chunks) * chunk
    return allowed


def _bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return (1.0 - allowed.to(dtype)) * -1.0e10


class CausalConditionalDecoder(nn.Module):
    def __init__(self, cfg: EstimatorConfig):
        super().__init__()
        if len(cfg.channels) != 1:
            raise ValueError("only the single-stage layout of CosyVoice2 (one channel entry) is supported")
        self.cfg = cfg
        ch = cfg.channels[0]
        time_dim = ch * 4
        block = lambda: BasicTransformerBlock(ch, cfg.num_heads, cfg.attention_head_dim, cfg.act_fn)  # noqa: E731
        self.time_embeddings = SinusoidalPosEmb(cfg.in_channels)
        self.time_mlp = TimestepEmbedding(cfg.in_channels, time_dim)
        # one stage each; the last stage's "down/upsample" is a plain causal conv (no resampling)
        self.down_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        CausalResnetBlock1D(cfg.in_channels, ch, time_dim),
                        nn.ModuleList([block() for _ in range(cfg.n_blocks)]),
                        CausalConv1d(ch, ch, 3),
                    ]
                )
            ]
        )
        self.mid_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        CausalResnetBlock1D(ch, ch, time_dim),
                        nn.ModuleList([block() for _ in range(cfg.n_blocks)]),
                    ]
                )
                for _ in range(cfg.num_mid_blocks)
            ]
        )
        self.up_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        CausalResnetBlock1D(2 * ch, ch, time_dim),
                        nn.ModuleList([block() for _ in range(cfg.n_blocks)]),
                        CausalConv1d(ch, ch, 3),
                    ]
                )
            ]
        )
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = nn.Conv1d(ch, cfg.out_channels, 1)

    def time_embedding(self, t: Tensor) -> Tensor:  # [B] -> [B, 4*ch]
        return self.time_mlp(self.time_embeddings(t).to(t.dtype))

    def _stages(self):
        ((res, blocks, down),) = self.down_blocks
        ((up_res, up_blocks_, up),) = self.up_blocks
        return res, blocks, down, up_res, up_blocks_, up

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor,
        cond: Tensor,
        streaming: bool = False,
        left_chunks: int | None = None,
    ) -> Tensor:
        """x, mu, cond [B, 80, T]; mask [B, 1, T]; t [B]; spks [B, 80] -> [B, 80, T].
        `left_chunks` (streaming only) limits attention to that many earlier chunks, like the
        official `num_decoding_left_chunks`; None means the config's value (-1: unlimited)."""
        if left_chunks is None and self.cfg.num_decoding_left_chunks >= 0:
            left_chunks = self.cfg.num_decoding_left_chunks
        t_emb = self.time_embedding(t)
        T = x.shape[-1]
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, T), cond], dim=1)
        valid = mask[:, 0].bool()  # [B, T]
        pos = torch.arange(T, device=x.device)
        allowed = valid.unsqueeze(1)  # [B, 1, T_k]: padding mask only
        if streaming:
            allowed = allowed & chunk_allowed(pos, pos, self.cfg.static_chunk_size, left_chunks).unsqueeze(0)
        else:
            allowed = allowed.expand(-1, T, -1)
        bias = _bias(allowed, h.dtype).unsqueeze(1)  # [B, 1, T, T]

        res, blocks, down, up_res, up_blocks_, up = self._stages()
        h = self._transformers(res(h, mask, t_emb), blocks, bias)
        skip = h
        h = down(h * mask)
        for mid_res, mid_tr in self.mid_blocks:
            h = self._transformers(mid_res(h, mask, t_emb), mid_tr, bias)
        h = torch.cat([h[:, :, : skip.shape[-1]], skip], dim=1)
        h = self._transformers(up_res(h, mask, t_emb), up_blocks_, bias)
        h = up(h * mask)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask

    @staticmethod
    def _transformers(
        h: Tensor,
        blocks: nn.ModuleList,
        bias: Tensor | list | None,
        cache: EstimatorCache | CacheGroup | None = None,
        keep_from: int | list[int] = 0,
    ) -> Tensor:
        h = h.transpose(1, 2)
        for block in blocks:
            h = block(h, bias, cache, keep_from)
        return h.transpose(1, 2)

    def _unet(
        self,
        h: Tensor,
        t_emb: Tensor,
        cache: CacheGroup | SlotBatch,
        biases: list | None,
        keeps: list[int] | int,
    ) -> Tensor:
        """The network over new frames ``h`` [B, in_channels, n] against ``cache``."""
        res, blocks, down, up_res, up_blocks_, up = self._stages()
        h = self._transformers(res(h, None, t_emb, cache), blocks, biases, cache, keeps)
        skip = h
        h = down(h, cache)
        for mid_res, mid_tr in self.mid_blocks:
            h = self._transformers(mid_res(h, None, t_emb, cache), mid_tr, biases, cache, keeps)
        h = torch.cat([h, skip], dim=1)
        h = self._transformers(up_res(h, None, t_emb, cache), up_blocks_, biases, cache, keeps)
        h = up(h, cache)
        h = self.final_block(h, None, cache)
        return self.final_proj(h)

    def forward_chunk(
        self,
        x_new: Tensor,
        mu_new: Tensor,
        t: Tensor,
        spks: Tensor,
        cond_new: Tensor,
        cache: EstimatorCache | CacheGroup,
        t_emb: Tensor | None = None,
    ) -> Tensor:
        """Streaming evaluation of the next frames only: equal to `forward(..., streaming=True)` on
        the whole sequence, restricted to these frames (all-ones mask, i.e. one unpadded utterance
        per batch row). The previous call must have ended on a chunk boundary; a call whose length
        is not a multiple of the chunk size is the last one for this cache. `t_emb` may be passed
        precomputed (it depends only on t).

        With a :class:`CacheGroup` the call evaluates the same number of new frames for several
        streams at once (their rows in turn), each at its own position against its own cache."""
        n = x_new.shape[-1]
        if n == 0:
            return x_new.new_zeros(x_new.shape[0], self.cfg.out_channels, 0)
        if t_emb is None:
            t_emb = self.time_embedding(t)
        h = torch.cat([x_new, mu_new, spks.unsqueeze(-1).expand(-1, -1, n), cond_new], dim=1)
        if isinstance(cache, SlotBatch):  # the slots' state and visibility are the batch's
            return self._unet(h, t_emb, cache, None, 0)
        group = _group(cache)
        if any(c.closed for c in group):
            raise RuntimeError("this EstimatorCache is closed (its last chunk was partial or it was cleared)")
        chunk = self.cfg.static_chunk_size
        biases, keeps = [], []
        for c in group:
            start, end = c.frames, c.frames + n
            # on the host: deciding whether to mask needs no device sync
            allowed = chunk_allowed(
                torch.arange(start, end), torch.arange(c.kv_start, end), chunk, c.left_chunks
            )
            # a one-chunk call sees every cached key: no mask lets SDPA take its faster unmasked path
            biases.append(None if bool(allowed.all()) else _bias(to_device(allowed, x_new.device), h.dtype))
            # keys that no later query can see (sliding window) are dropped after this call
            keep_from = 0
            if c.left_chunks is not None:
                first_needed = max((end // chunk - c.left_chunks) * chunk, 0)
                keep_from = max(first_needed - c.kv_start, 0)
            keeps.append(keep_from)
        out = self._unet(h, t_emb, group, biases, keeps)
        for c, keep_from in zip(group, keeps, strict=True):
            c.frames += n
            c.kv_start += keep_from
            if c.frames % chunk:
                c.closed = True
        return out
