"""The flow's Euler steps for a round of whole chunks, at fixed shapes, captured as CUDA graphs.

One flow chunk of one stream is ten estimator evaluations of a U-Net with 56 transformer blocks:
some 15,000 kernels, whose launches bound it on a GPU however many streams share the round.
With the streams' state in :class:`~cosyvoice.flow_estimator.EstimatorSlots` a round of whole
chunks has fixed shapes once the streams are padded to a bucket (1, 2, 4, ... up to the slots;
padding rows use the spare slot), so the ten steps of each bucket are one CUDA graph, recorded
when the model warms up and replayed with the round's inputs copied into its buffers.  The
encoder (per stream) and the vocoder stay eager.  Without CUDA the same fixed-shape function runs
eagerly (what the tests compare with the per-stream path).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from .flow import CausalMaskedDiffWithXvec, EulerSteps, euler_solve
from .flow_estimator import EstimatorSlots, SlotBatch
from .lm_graphs import GraphCaptureFailed, buckets, fixed_attention, record_graph

__all__ = ["FlowGraphs"]


@dataclass
class _Round:
    """One bucket's static inputs: what a replay reads."""

    x: Tensor  # [B, 80, F] the noise
    mu: Tensor  # [2B, 80, F] each stream's CFG rows in turn
    cond: Tensor  # [2B, 80, F]
    spks: Tensor  # [2B, 80]
    slots: SlotBatch  # slots [B], ring positions [B, F], visibility [2B, 1, 1, ring]

    def load(self, batch: SlotBatch) -> None:
        """Copy a round's slots, ring positions and visibility into the static ones."""
        self.slots.slots.copy_(batch.slots)
        self.slots.pos.copy_(batch.pos)
        self.slots.visible.copy_(batch.visible)


class FlowGraphs:
    """Rounds of whole chunks of streams in ``slots`` at fixed shapes (CUDA graphs on a GPU)."""

    def __init__(
        self,
        flow: CausalMaskedDiffWithXvec,
        slots: EstimatorSlots,
        capture: bool | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """``compute_dtype``: the estimator's precision (see :class:`~cosyvoice.flow.EulerSteps`)."""
        weight = flow.input_embedding.weight
        self.device = weight.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the flow on a CUDA device")
        self.flow, self.store = flow, slots
        self.estimator = flow.decoder.estimator
        self.solver = EulerSteps.of(flow, len(slots.keys), compute_dtype)
        self.frames = slots.chunk  # a whole chunk: what every round but a stream's last adds
        self.buckets = buckets(slots.slots)
        mels, spk = self.estimator.cfg.out_channels, flow.spk_embed_affine_layer.out_features
        self._rounds = {}
        for b in self.buckets:
            padding = slots.batch([], [], self.frames, pad_to=b)
            self._rounds[b] = _Round(
                torch.zeros(b, mels, self.frames, dtype=weight.dtype, device=self.device),
                torch.zeros(2 * b, mels, self.frames, dtype=weight.dtype, device=self.device),
                torch.zeros(2 * b, mels, self.frames, dtype=weight.dtype, device=self.device),
                torch.zeros(2 * b, spk, dtype=weight.dtype, device=self.device),
                padding,
            )
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self._stream = torch.cuda.Stream(self.device) if self.capture else None
        self._lock = threading.Lock()
        self.rounds = 0  # rounds run at fixed shapes
        self.replays = 0  # of which replayed as CUDA graphs

    def takes(self, streams: int, frames: int) -> bool:
        """Whether a round of ``streams`` streams adding ``frames`` frames each runs here."""
        return 0 < streams <= self.buckets[-1] and frames == self.frames

    def __call__(
        self, x: Tensor, mu: Tensor, cond: Tensor, spks: Tensor, slots: list[int], frames: list[int]
    ) -> Tensor:
        """The mel [B, 80, F] of a round (inputs as :func:`~cosyvoice.flow.euler_solve`'s) of the
        streams in ``slots`` whose estimators have evaluated ``frames`` frames each."""
        n = len(slots)
        size = next(b for b in self.buckets if b >= n)
        inputs = self._rounds[size]
        with self._lock:  # one round at a time in the static buffers (callers share a stream)
            inputs.load(self.store.batch(slots, frames, self.frames, pad_to=size))
            for static, given in ((inputs.x, x), (inputs.mu, mu), (inputs.cond, cond), (inputs.spks, spks)):
                static[: len(given)].copy_(given)
                static[len(given) :].zero_()
            graph = self._graphs.get(size)
            if graph is None:
                out = self._solve(inputs)
            else:
                graph[0].replay()
                out = graph[1]
                self.replays += 1
            self.rounds += 1
            return out[:n].clone()

    def capture_all(self) -> int:
        """Record every bucket's graph (the model's warm-up does, before a server takes requests);
        returns how many exist (0 without CUDA).  Raises :class:`GraphCaptureFailed` when one
        cannot be recorded."""
        if not self.capture:
            return 0
        for size in reversed(self.buckets):  # the largest first: the shared pool then fits the rest
            if size not in self._graphs:
                try:
                    self._record(size)
                except RuntimeError as e:
                    raise GraphCaptureFailed(
                        f"recording the flow's Euler steps as a CUDA graph failed ({e}); "
                        "run without CUDA graphs (realtime serve --cuda-graphs off)"
                    ) from e
        return len(self._graphs)

    def _solve(self, inputs: _Round) -> Tensor:
        with fixed_attention():
            return euler_solve(
                self.estimator,
                self.solver,
                inputs.x,
                inputs.mu,
                inputs.cond,
                inputs.spks,
                inputs.slots.at_step,
            )

    def _record(self, size: int) -> None:
        """Record a bucket's graph, its inputs set to padding (every write goes to the spare slot)."""
        inputs = self._rounds[size]
        inputs.load(self.store.batch([], [], self.frames, pad_to=size))
        for static in (inputs.x, inputs.mu, inputs.cond, inputs.spks):
            static.zero_()
        self._graphs[size] = record_graph(
            lambda: self._solve(inputs), self.device, self._stream, self._mempool
        )
