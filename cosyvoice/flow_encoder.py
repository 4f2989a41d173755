"""The flow's token encoder (CosyVoice2 `UpsampleConformerEncoder`): tokens -> 2x upsampled features.

Submodule names follow the official class so that `flow.pt`'s `encoder.*` tensors load unchanged.

Two ways to run it:
- `forward(xs, xs_lens, context, streaming)` encodes whole sequences exactly as the official call does
  (streaming: block-causal attention with 25-token chunks before the upsampling, 50 frames after).
- `forward_chunk(xs_chunk, context, cache)` encodes only new tokens against an `EncoderCache`. In
  streaming mode a frame never depends on frames of later chunks except through the 3-token
  pre-lookahead, so for chunk-aligned calls the frames of earlier chunks are final; the cache keeps
  what later chunks still read: the attention keys/values of every block, the last 2 embedded tokens
  (left context of the pre-lookahead layer's second conv, recomputed from real tokens) and the last 4
  upsampled frames (left context of the up_layer conv). Cost per chunk is constant apart from the
  attention over cached keys; `EncoderCache(left_chunks=N)` bounds that too by dropping keys older
  than N chunks (then the result equals `forward(..., left_chunks=N)`, not the official call).

Memory (REAL config, fp32): the cache holds keys+values of 6 token-level blocks (1 position per token)
and 4 frame-level blocks (2 frames per token): (6*2*512 + 4*2*2*512) * 4 = 57,344 bytes per token
(22.9 MB for 400 tokens; buffers grow by doubling, so up to 2x that is allocated), plus 2 embedded
tokens and 4 upsampled frames. Per attention module, the projected relative positions of every
distance used so far are shared by all requests (one 512-float row per distance).

API (imported by cosyvoice/flow.py; keep stable):
    EncoderConfig(...), EncoderConfig.from_dict(d)
    UpsampleConformerEncoder(cfg)
        .forward(xs [B,T,C], xs_lens [B], context [B,c<=3,C] | None = None, streaming=False,
                 taps: dict | None = None, left_chunks: int | None = None) -> (h [B,2T,C], h_lens [B])
        .new_cache(left_chunks: int | None = None) -> EncoderCache
        .forward_chunk(xs_chunk [1,n,C], context [1,c<=3,C] | None, cache) -> h_new [1,2n,C]
    EncoderCache: tokens_done, frames_done, finished, left_chunks, nbytes(), live_nbytes()
    EncoderConfig.cache_bytes_per_token(bytes_per_element=4)
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import to_device
from .flow_estimator import chunk_allowed

__all__ = ["EncoderConfig", "EncoderCache", "UpsampleConformerEncoder", "chunk_mask", "rel_position_table"]


@dataclass
class EncoderConfig:
    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4
    static_chunk_size: int = 25  # tokens; after upsampling the chunk is static_chunk_size * up_stride frames
    pre_lookahead_len: int = 3
    pre_lookahead_channels: int = 512  # hard-coded 512 in the official class
    up_stride: int = 2
    layer_norm_eps: float = 1e-12  # inside the conformer blocks
    embed_norm_eps: float = 1e-5  # embed, up_embed, after_norm

    # Structural options of the official yaml that this implementation supports only with these values.
    _FIXED: ClassVar[dict] = {
        "normalize_before": True,
        "input_layer": "linear",
        "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "rel_selfattn",
        "activation_type": "swish",
        "use_cnn_module": False,
        "macaron_style": False,
        "key_bias": True,
    }
    _ALIASES: ClassVar[dict] = {
        "layer_norm_eps_in_layers": "layer_norm_eps",
        "layer_norm_eps_embed_and_after_norm": "embed_norm_eps",
    }
    # Training-only knobs of the official yaml that do not change inference.
    _IGNORED: ClassVar[set] = {
        "dropout_rate",
        "positional_dropout_rate",
        "attention_dropout_rate",
        "use_dynamic_chunk",
        "use_dynamic_left_chunk",
        "global_cmvn",
        "gradient_checkpointing",
        # Only read by the conv module / conv feed-forward, which this config does not have.
        "positionwise_conv_kernel_size",
        "cnn_module_kernel",
        "cnn_module_norm",
        "causal",
    }

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            name = cls._ALIASES.get(key, key)
            if name in known:
                kwargs[name] = value
            elif key in cls._FIXED:
                if value != cls._FIXED[key]:
                    raise ValueError(
                        f"encoder option {key}={value!r} is not supported (only {cls._FIXED[key]!r})"
                    )
            elif key not in cls._IGNORED:
                raise ValueError(f"unknown encoder option {key!r}")
        return cls(**kwargs)

    def cache_bytes_per_token(self, bytes_per_element: int = 4) -> int:
        """Bytes an `EncoderCache` holds per encoded token (keys + values of every block)."""
        per_frame = 2 * self.output_size * bytes_per_element
        return self.num_blocks * per_frame + self.num_up_blocks * self.up_stride * per_frame


def rel_position_table(distances: Tensor, d_model: int) -> Tensor:
    """ESPnet relative positional encoding rows for the given relative distances, float32 [L, d_model].

    The official table for length T is this with distances T-1, T-2, ..., -(T-1); computing the rows
    elementwise from the distance gives the same float32 values for any subset of distances.
    """
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=distances.device)
        * -(math.log(10000.0) / d_model)
    )
    angle = distances.to(torch.float32).unsqueeze(1) * div_term
    pe = torch.zeros(distances.numel(), d_model, dtype=torch.float32, device=distances.device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe


def chunk_mask(
    n_query: int,
    n_key: int,
    chunk: int,
    q_start: int = 0,
    k_start: int = 0,
    left_chunks: int | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Block-causal mask [n_query, n_key] over absolute positions: a query sees every key of its own
    chunk and of earlier chunks (the last `left_chunks` of them when set); the estimator's rule
    (:func:`~cosyvoice.flow_estimator.chunk_allowed`) over position ranges."""
    q = torch.arange(q_start, q_start + n_query, device=device)
    return chunk_allowed(q, torch.arange(k_start, k_start + n_key, device=device), chunk, left_chunks)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm, scaled by sqrt(d); the positional table is returned beside it, not added."""

    def __init__(self, idim: int, odim: int, eps: float):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=eps))
        self.xscale = math.sqrt(odim)
        self.d_model = odim

    def embed(self, x: Tensor) -> Tensor:
        return self.out(x) * self.xscale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        T = x.size(1)
        distances = torch.arange(T - 1, -T, -1, device=x.device)
        pos_emb = rel_position_table(distances, self.d_model).to(dtype=x.dtype).unsqueeze(0)  # [1, 2T-1, C]
        return self.embed(x), pos_emb


class _KVBuffer:
    """Growable per-layer key/value store [H, capacity, d_k] covering absolute positions
    [start, start + length); appends are amortised O(new) and old positions can be dropped."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.lo = 0
        self.hi = 0
        self.start = 0  # absolute position of self.k[:, lo]

    @property
    def length(self) -> int:
        return self.hi - self.lo

    def append(self, k: Tensor, v: Tensor) -> None:  # [H, n, d_k] each
        n = k.size(1)
        stale_mode = self.k is not None and self.k.is_inference() != torch.is_inference_mode_enabled()
        if self.k is None or self.hi + n > self.k.size(1) or stale_mode:
            live = self.length
            cap = max(2 * (live + n), 64)
            new_k = k.new_empty(k.size(0), cap, k.size(2))
            new_v = v.new_empty(v.size(0), cap, v.size(2))
            if live:
                new_k[:, :live] = self.k[:, self.lo : self.hi]
                new_v[:, :live] = self.v[:, self.lo : self.hi]
            self.k, self.v, self.lo, self.hi = new_k, new_v, 0, live
        self.k[:, self.hi : self.hi + n] = k
        self.v[:, self.hi : self.hi + n] = v
        self.hi += n

    def keys(self) -> tuple[Tensor, Tensor]:
        return self.k[:, self.lo : self.hi], self.v[:, self.lo : self.hi]

    def clone(self) -> _KVBuffer:
        """An independent copy of the live keys/values (appends to either leave the other as is)."""
        copy = _KVBuffer()
        if self.k is not None:
            copy.k, copy.v = self.k[:, self.lo : self.hi].clone(), self.v[:, self.lo : self.hi].clone()
        copy.lo, copy.hi, copy.start = 0, self.length, self.start
        return copy

    def drop_before(self, position: int) -> None:
        count = min(max(position - self.start, 0), self.length)
        self.lo += count
        self.start += count

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() * 2

    def live_nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.length * self.k.size(0) * self.k.size(2) * self.k.element_size() * 2


@dataclass
class EncoderCache:
    """Per-request state of `UpsampleConformerEncoder.forward_chunk`.

    Holds keys/values of already-final positions for every block (token-level blocks, then
    upsampled-frame blocks), the last 2 embedded tokens (pre-lookahead conv2 left context), the last
    4 upsampled frames (up_layer conv left context) and the counts of tokens/frames done. A chunk
    with `context=None` is final: afterwards the cache is `finished` and refuses more input.
    `left_chunks=N` keeps only the keys of the last N chunks (before each query's own chunk).
    """

    left_chunks: int | None = None
    tokens_done: int = 0
    frames_done: int = 0
    finished: bool = False
    lookahead_x: Tensor | None = None  # [1, <=2, C] last embedded tokens
    up_state: Tensor | None = None  # [1, C, 2*up_stride] last upsampled frames (zeros at start)
    layers: list[_KVBuffer] = field(default_factory=list)
    up_layers: list[_KVBuffer] = field(default_factory=list)

    def __post_init__(self):
        if self.left_chunks is not None and self.left_chunks < 0:
            raise ValueError("left_chunks must be >= 0 or None")

    def nbytes(self) -> int:
        """Bytes of tensor storage held (allocated capacity included)."""
        total = sum(b.nbytes() for b in self.layers + self.up_layers)
        for t in (self.lookahead_x, self.up_state):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def live_nbytes(self) -> int:
        """Bytes of cached keys/values actually in use (what grows with the utterance)."""
        return sum(b.live_nbytes() for b in self.layers + self.up_layers)

    def clone(self) -> EncoderCache:
        """An independent copy: a voice's prompt is encoded once and every stream of that voice
        goes on from its own copy."""
        return EncoderCache(
            left_chunks=self.left_chunks,
            tokens_done=self.tokens_done,
            frames_done=self.frames_done,
            finished=self.finished,
            lookahead_x=None if self.lookahead_x is None else self.lookahead_x.clone(),
            up_state=None if self.up_state is None else self.up_state.clone(),
            layers=[b.clone() for b in self.layers],
            up_layers=[b.clone() for b in self.up_layers],
        )


class _ProjectedPositions:
    """linear_pos(relative positional table) for the distances incremental attention has needed so far,
    shared by all requests of one attention module.

    Distances >= 0 and < 0 are kept in two append-only stores ordered by |distance|, so a longer
    utterance (or a longer chunk) only projects its new distances: constant cost per chunk instead
    of re-projecting the whole table. Rebuilt when the weights change (load_state_dict, .to).
    """

    def __init__(self):
        self.pos: Tensor | None = None  # [capacity, C]; row i is distance i
        self.neg: Tensor | None = None  # [capacity, C]; row i is distance -(i + 1)
        self.n_pos = 0
        self.n_neg = 0
        self.key: tuple | None = None
        self.lock = threading.Lock()

    @torch.no_grad()
    def rows(self, linear_pos: nn.Linear, hi: int, lo: int) -> Tensor:
        """Rows for distances hi, hi-1, ..., -lo, [hi+lo+1, C] (a fresh tensor)."""
        w = linear_pos.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, torch.is_inference_mode_enabled())
        with self.lock:
            if self.key != key:
                self.key, self.pos, self.neg, self.n_pos, self.n_neg = key, None, None, 0, 0
            if hi + 1 > self.n_pos:
                self.pos = self._extend(linear_pos, self.pos, self.n_pos, hi + 1, sign=1)
                self.n_pos = hi + 1
            if lo > self.n_neg:
                self.neg = self._extend(linear_pos, self.neg, self.n_neg, lo, sign=-1)
                self.n_neg = lo
            pos, neg = self.pos, self.neg
        parts = [pos[: hi + 1].flip(0)] if hi >= 0 else []
        if lo > 0:
            parts.append(neg[:lo])
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    @staticmethod
    def _extend(linear_pos: nn.Linear, buf: Tensor | None, count: int, new_count: int, sign: int) -> Tensor:
        """Append rows count..new_count-1 to buf (distance sign*i, or -(i+1) for sign -1), growing it."""
        w = linear_pos.weight
        if buf is None or new_count > buf.size(0):
            grown = w.new_empty(max(2 * new_count, 256), w.size(1))
            if count:
                grown[:count] = buf[:count]
            buf = grown
        idx = torch.arange(count, new_count, device=w.device)
        distances = idx if sign > 0 else -(idx + 1)
        table = rel_position_table(distances, w.size(1)).to(w.dtype)
        buf[count:new_count] = linear_pos(table)
        return buf


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL style attention with ESPnet's relative positions and pos_bias_u/v."""

    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        assert n_feat % n_head == 0
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))
        self._pos_rows = _ProjectedPositions()

    def _split(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, H, d_k]
        return x.view(x.size(0), x.size(1), self.h, self.d_k)

    @staticmethod
    def rel_shift(x: Tensor) -> Tensor:
        """[B, H, T, 2T-1] scores against distances T-1..-(T-1) -> [B, H, T, T] scores for distance i-j."""
        B, H, T, W = x.shape
        padded = torch.cat([x.new_zeros(B, H, T, 1), x], dim=-1).view(B, H, W + 1, T)
        return padded[:, :, 1:].reshape(B, H, T, W)[:, :, :, : W // 2 + 1]

    def _attend(self, scores: Tensor, mask: Tensor, v: Tensor) -> Tensor:
        blocked = ~mask
        scores = scores.masked_fill(blocked, -float("inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        return torch.matmul(attn, v)

    def forward(self, x: Tensor, mask: Tensor, pos_emb: Tensor) -> Tensor:
        """x [B, T, C], mask [B, T or 1, T] (True = attend), pos_emb [1, 2T-1, C]."""
        B, T, _ = x.shape
        q = self._split(self.linear_q(x))
        k = self._split(self.linear_k(x)).transpose(1, 2)  # [B, H, T, d_k]
        v = self._split(self.linear_v(x)).transpose(1, 2)
        p = self._split(self.linear_pos(pos_emb)).transpose(1, 2)  # [1, H, 2T-1, d_k]
        matrix_ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        matrix_bd = self.rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        out = self._attend(scores, mask.unsqueeze(1), v)  # [B, H, T, d_k]
        return self.linear_out(out.transpose(1, 2).reshape(B, T, self.h * self.d_k))

    def projected_positions(self, hi: int, lo: int) -> Tensor:
        """linear_pos rows for distances hi, hi-1, ..., -lo as [H, hi+lo+1, d_k] (a copy)."""
        rows = self._pos_rows.rows(self.linear_pos, hi, lo)
        return rows.view(-1, self.h, self.d_k).transpose(0, 1)

    def forward_chunk(
        self, x: Tensor, kvs: list[_KVBuffer], q_starts: list[int], masks: list[Tensor | None]
    ) -> Tensor:
        """x [B, n, C]: new positions q_starts[b].. of stream b, whose keys are appended to kvs[b]
        first; masks[b] [n, kvs[b].length] (None: all visible).  The projections run on all B streams at once; the
        scores, with each stream's own relative positions, one stream at a time."""
        B, n = x.size(0), x.size(1)
        q = self._split(self.linear_q(x))  # [B, n, H, d_k]
        k = self._split(self.linear_k(x)).transpose(1, 2)  # [B, H, n, d_k]
        v = self._split(self.linear_v(x)).transpose(1, 2)
        outs = []
        for b in range(B):
            outs.append(self._attend_chunk(q[b], k[b], v[b], kvs[b], q_starts[b], masks[b]))
        out = outs[0] if B == 1 else torch.stack(outs)
        return self.linear_out(out.transpose(-3, -2).reshape(B, n, self.h * self.d_k))

    def _attend_chunk(
        self, q: Tensor, k: Tensor, v: Tensor, kv: _KVBuffer, q_start: int, mask: Tensor | None
    ) -> Tensor:
        """One stream: q [n, H, d_k], its new k/v [H, n, d_k] -> attention [H, n, d_k]."""
        n = q.size(0)
        kv.append(k, v)
        k, v = kv.keys()  # [H, L, d_k]
        L = k.size(1)
        matrix_ac = torch.matmul((q + self.pos_bias_u).transpose(0, 1), k.transpose(-2, -1))  # [H, n, L]
        # Query a (absolute q_start + a) against key b (kv.start + b) needs distance q_start + a - kv.start - b,
        # which lies in [-(n-1), d_max]; project those W = L + n - 1 distances once, then take for row a the
        # W-window starting at column n-1-a (a strided view: the generalised rel_shift).
        d_max = q_start + n - 1 - kv.start
        p = self.projected_positions(d_max, n - 1)  # [H, W, d_k]
        full_bd = torch.matmul((q + self.pos_bias_v).transpose(0, 1), p.transpose(-2, -1)).contiguous()
        W = full_bd.size(-1)
        matrix_bd = full_bd.as_strided((self.h, n, L), (n * W, W - 1, 1), full_bd.storage_offset() + n - 1)
        scores = matrix_ac.add_(matrix_bd).div_(math.sqrt(self.d_k))  # in place: no grad in forward_chunk
        if mask is None:  # one chunk of queries seeing every cached key: nothing to mask
            return torch.matmul(torch.softmax(scores, dim=-1), v)
        return self._attend(scores, mask.unsqueeze(0), v)  # [H, n, d_k]


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(d, hidden)
        self.w_2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-norm self-attention + feed-forward (the official config has no macaron FF and no conv module)."""

    def __init__(self, d: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, d)
        self.feed_forward = PositionwiseFeedForward(d, hidden)
        self.norm_ff = nn.LayerNorm(d, eps=eps)
        self.norm_mha = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor, mask: Tensor, pos_emb: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))

    def forward_chunk(
        self, x: Tensor, kvs: list[_KVBuffer], q_starts: list[int], masks: list[Tensor | None]
    ) -> Tensor:
        x = x + self.self_attn.forward_chunk(self.norm_mha(x), kvs, q_starts, masks)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Residual conv pair that lets each token see the next `pre_lookahead_len` tokens."""

    def __init__(self, channels: int, hidden: int, pre_lookahead_len: int):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, hidden, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(hidden, channels, kernel_size=3)

    def _lookahead(self, x: Tensor, context: Tensor | None) -> Tensor:
        """[B, T, C] (+ context [B, c, C]) -> conv1 activations [B, hidden, T]; missing lookahead is zeros."""
        c = 0 if context is None else context.size(1)
        if c > self.pre_lookahead_len:
            raise ValueError(f"context has {c} tokens, at most {self.pre_lookahead_len} allowed")
        inp = x if context is None or c == 0 else torch.cat([x, context], dim=1)
        inp = F.pad(inp.transpose(1, 2), (0, self.pre_lookahead_len - c))
        return F.leaky_relu(self.conv1(inp), 0.01)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        a = F.pad(self._lookahead(x, context), (self.conv2.kernel_size[0] - 1, 0))
        return self.conv2(a).transpose(1, 2) + x

    def forward_chunk(self, x: Tensor, left_x: Tensor | None, context: Tensor | None) -> Tensor:
        """x [B, n, C] continuing after `left_x` [B, l<=2, C] (the previous embedded tokens)."""
        left = 0 if left_x is None else left_x.size(1)
        inp = x if left == 0 else torch.cat([left_x, x], dim=1)
        a = F.pad(self._lookahead(inp, context), (self.conv2.kernel_size[0] - 1 - left, 0))
        return self.conv2(a).transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest-neighbour x stride, then a causal conv (left pad 2*stride)."""

    def __init__(self, channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, stride * 2 + 1)

    def forward(self, x: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:  # x [B, C, T]
        up = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(up, (self.stride * 2, 0))), lens * self.stride

    def forward_chunk(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, n], state [B, C, 2*stride] (previous upsampled frames) -> ([B, C_out, stride*n], new state)."""
        up = torch.cat([state, F.interpolate(x, scale_factor=float(self.stride), mode="nearest")], dim=2)
        return self.conv(up), up[:, :, up.size(2) - 2 * self.stride :]


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size
        self.embed = LinearEmbed(cfg.input_size, d, cfg.embed_norm_eps)
        self.after_norm = nn.LayerNorm(d, eps=cfg.embed_norm_eps)
        self.pre_lookahead_layer = PreLookaheadLayer(d, cfg.pre_lookahead_channels, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(
            ConformerBlock(d, cfg.attention_heads, cfg.linear_units, cfg.layer_norm_eps)
            for _ in range(cfg.num_blocks)
        )
        self.up_layer = Upsample1D(d, d, cfg.up_stride)
        self.up_embed = LinearEmbed(d, d, cfg.embed_norm_eps)
        self.up_encoders = nn.ModuleList(
            ConformerBlock(d, cfg.attention_heads, cfg.linear_units, cfg.layer_norm_eps)
            for _ in range(cfg.num_up_blocks)
        )

    @staticmethod
    def _masks(lens: Tensor, T: int, chunk: int, left_chunks: int | None) -> Tensor:
        """[B, T, T] attention mask: key padding, plus block-causal chunks when chunk > 0."""
        pad = torch.arange(T, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)  # [B, T]
        mask = pad.unsqueeze(1).expand(-1, T, -1)
        if chunk > 0:
            mask = mask & chunk_mask(T, T, chunk, left_chunks=left_chunks, device=lens.device)
        # As the official code does: a query with nothing to attend to (padding) attends everywhere.
        empty = ~mask.any(dim=-1, keepdim=True)
        return mask | empty

    def forward(
        self,
        xs: Tensor,
        xs_lens: Tensor,
        context: Tensor | None = None,
        streaming: bool = False,
        taps: dict | None = None,
        left_chunks: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """xs [B, T, input_size] -> (h [B, stride*T, output_size], h_lens [B]).

        `context` holds up to pre_lookahead_len tokens after xs that are seen only by the lookahead
        layer (the official finalize=False call); missing lookahead is zeros. `left_chunks` (not in
        the official call) limits streaming attention to that many earlier chunks.
        """
        cfg = self.cfg
        T = xs.size(1)
        x, pos_emb = self.embed(xs)
        if taps is not None:
            taps["embed_x"], taps["embed_posemb"] = x, pos_emb
        ctx = None
        if context is not None and context.size(1) > 0:
            ctx = self.embed.embed(context)
            if taps is not None:
                taps["context_embed_x"] = ctx
        chunk = cfg.static_chunk_size if streaming else 0
        mask = self._masks(xs_lens, T, chunk, left_chunks)
        x = self.pre_lookahead_layer(x, ctx)
        if taps is not None:
            taps["pre_lookahead"] = x
        for layer in self.encoders:
            x = layer(x, mask, pos_emb)
        if taps is not None:
            taps["encoders_out"] = x

        x, h_lens = self.up_layer(x.transpose(1, 2), xs_lens)
        if taps is not None:
            taps["up_layer_out"] = x
        T2 = x.size(2)
        x, pos_emb = self.up_embed(x.transpose(1, 2))
        if taps is not None:
            taps["up_embed_x"], taps["up_embed_posemb"] = x, pos_emb
        mask = self._masks(h_lens, T2, chunk * cfg.up_stride, left_chunks)
        for layer in self.up_encoders:
            x = layer(x, mask, pos_emb)
        if taps is not None:
            taps["up_encoders_out"] = x
        x = self.after_norm(x)
        if taps is not None:
            taps["h"] = x
        return x, h_lens

    def new_cache(self, left_chunks: int | None = None) -> EncoderCache:
        return EncoderCache(left_chunks=left_chunks)

    @torch.no_grad()
    def forward_chunk(self, xs_chunk: Tensor, context: Tensor | None, cache: EncoderCache) -> Tensor:
        """Encode the next n tokens of one request: [1, n, input_size] -> [1, stride*n, output_size].

        Equals frames [stride*s, stride*(s+n)) of `forward(all tokens so far, context, streaming=True)`
        (s = tokens before this chunk) when every non-final chunk has a multiple of static_chunk_size
        tokens and its context is the true next tokens. `context=None` marks the final chunk.
        """
        if xs_chunk.dim() != 3 or xs_chunk.size(0) != 1:
            raise ValueError(f"forward_chunk takes one request [1, n, C], got {tuple(xs_chunk.shape)}")
        return self.forward_chunks(xs_chunk, [context], [cache])

    @torch.no_grad()
    def forward_chunks(self, xs: Tensor, contexts: list[Tensor | None], caches: list[EncoderCache]) -> Tensor:
        """:meth:`forward_chunk` for B requests that each encode their next n tokens: xs [B, n,
        input_size] -> [B, stride*n, output_size].  Every linear layer, convolution and norm runs
        on all of them at once; only attention (each request's own keys and relative positions)
        runs request by request.  Streams whose lookahead differs in length (the last chunk, a
        short context) are encoded in groups of alike ones."""
        cfg = self.cfg
        n = xs.size(1)
        if xs.dim() != 3 or xs.size(0) != len(caches) or len(contexts) != len(caches):
            raise ValueError(f"forward_chunks takes one row of xs [B, n, C] per cache, got {tuple(xs.shape)}")
        if len({c.left_chunks for c in caches}) > 1:
            raise ValueError("requests encoded together must have the same window (left_chunks)")
        for context, cache in zip(contexts, caches, strict=True):
            if cache.finished:
                raise RuntimeError("encoder cache is finished (its last chunk had no context)")
            if context is not None and context.size(1) > cfg.pre_lookahead_len:
                raise ValueError(
                    f"context has {context.size(1)} tokens, at most {cfg.pre_lookahead_len} allowed"
                )
            if context is not None and n % cfg.static_chunk_size != 0:
                raise ValueError(
                    f"a non-final chunk must be a multiple of {cfg.static_chunk_size} tokens, got {n} "
                    "(pass context=None for the final chunk)"
                )
            if not cache.layers:
                cache.layers = [_KVBuffer() for _ in self.encoders]
                cache.up_layers = [_KVBuffer() for _ in self.up_encoders]
        stride, d = cfg.up_stride, cfg.output_size
        if n == 0:
            for context, cache in zip(contexts, caches, strict=True):
                cache.finished = context is None
            return xs.new_zeros(len(caches), 0, d)

        x = self.embed.embed(xs)
        # the lookahead layer's inputs differ in length from stream to stream at their first and
        # last chunks: it runs on groups of streams with as much left and right context
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (context, cache) in enumerate(zip(contexts, caches, strict=True)):
            left = 0 if cache.lookahead_x is None else cache.lookahead_x.size(1)
            groups.setdefault((left, 0 if context is None else context.size(1)), []).append(i)
        y = torch.empty_like(x)
        for (left, right), rows in groups.items():
            left_x = torch.cat([caches[i].lookahead_x for i in rows]) if left else None
            ctx = self.embed.embed(torch.cat([contexts[i] for i in rows])) if right else None
            if len(rows) == len(caches):  # one group (the usual case): no indexing
                y = self.pre_lookahead_layer.forward_chunk(x, left_x, ctx)
                break
            index = to_device(rows, x.device)  # (a list index would be copied with a device sync)
            y.index_copy_(
                0, index, self.pre_lookahead_layer.forward_chunk(x.index_select(0, index), left_x, ctx)
            )
        for i, cache in enumerate(caches):
            left_x = cache.lookahead_x
            cache.lookahead_x = (
                x[i : i + 1] if left_x is None else torch.cat([left_x, x[i : i + 1]], dim=1)
            )[:, -2:]

        starts = [c.tokens_done for c in caches]
        y = self._blocks_chunk(
            self.encoders, [c.layers for c in caches], y, starts, cfg.static_chunk_size, caches[0].left_chunks
        )
        states = torch.cat(
            [c.up_state if c.up_state is not None else y.new_zeros(1, d, 2 * stride) for c in caches]
        )
        up, states = self.up_layer.forward_chunk(y.transpose(1, 2), states)
        z = self.up_embed.embed(up.transpose(1, 2))
        z = self._blocks_chunk(
            self.up_encoders,
            [c.up_layers for c in caches],
            z,
            [c.frames_done for c in caches],
            cfg.static_chunk_size * stride,
            caches[0].left_chunks,
        )
        for i, (context, cache) in enumerate(zip(contexts, caches, strict=True)):
            cache.up_state = states[i : i + 1].clone()
            cache.tokens_done += n
            cache.frames_done += stride * n
            cache.finished = context is None
        return self.after_norm(z)

    @staticmethod
    def _blocks_chunk(
        blocks: nn.ModuleList,
        kvs: list[list[_KVBuffer]],
        x: Tensor,
        starts: list[int],
        chunk: int,
        left_chunks: int | None,
    ) -> Tensor:
        """x [B, n, C] through ``blocks``; stream b's keys are ``kvs[b]`` (one per block) and its
        queries start at ``starts[b]``."""
        n = x.size(1)
        masks: list[Tensor | None] = []  # None: the stream's queries see all its keys
        for mine, start in zip(kvs, starts, strict=True):  # on the host: deciding needs no device sync
            mask = chunk_mask(
                n, mine[0].length + n, chunk, q_start=start, k_start=mine[0].start, left_chunks=left_chunks
            )
            masks.append(None if bool(mask.all()) else to_device(mask, x.device))
        for j, block in enumerate(blocks):
            x = block.forward_chunk(x, [mine[j] for mine in kvs], starts, masks)
        if left_chunks is not None:
            for mine, start in zip(kvs, starts, strict=True):
                keep_from = ((start + n) // chunk - left_chunks) * chunk
                for kv in mine:
                    kv.drop_before(keep_from)
        return x
