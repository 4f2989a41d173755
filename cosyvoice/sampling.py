"""Speech-token sampling: nucleus + repetition-aware sampling (RAS, from VALL-E 2).

Randomness comes from an explicit ``torch.Generator`` (the official code uses torch's global RNG),
so a request is reproducible and concurrent requests do not disturb each other's draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "Sampler",
    "RasSampler",
    "nucleus_batch",
    "nucleus_candidates",
    "ras_batch",
    "ras_sampling",
    "random_sampling",
]


class Sampler(Protocol):
    """Chooses the next speech token from ``logp`` [V] (log-probabilities, masked ids at -inf)
    given the tokens generated so far in this request."""

    def __call__(self, logp: torch.Tensor, decoded_tokens: Sequence[int]) -> int: ...


def nucleus_candidates(
    logp: torch.Tensor, top_p: float = 0.8, top_k: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [n], ids [n]) of the nucleus: the most probable ids, taken in stable descending order
    while the probability already taken is below ``top_p`` and fewer than ``top_k`` are taken, so
    the candidate that crosses ``top_p`` is included.  Probabilities are not renormalised."""
    return nucleus_batch(logp[None], top_p, top_k)[0]


def nucleus_batch(
    logps: torch.Tensor, top_p: float = 0.8, top_k: int = 25
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`nucleus_candidates` of every row of ``logps`` [B, V], in a few batched operations
    (the LM stage draws for every request of a step at once; per row it cost 30-50 us).

    The reference sorts the whole vocabulary (stable, descending) and sums candidates one at a
    time in float32; this gives the same candidates from a ``topk`` (a full sort of 6561 ids costs
    30x more): ties are put in id order, ties at the boundary are filled from the lowest ids, and
    the running sum is a float32 cumsum.
    """
    probs = logps.float().softmax(dim=-1)
    k = min(top_k, probs.shape[-1])
    values_t, ids_t = probs.topk(k, dim=-1)
    boundary = values_t[:, -1:]
    # rows with equal values beyond the top k: the lowest ids win (rare; done per row)
    spill = ((probs == boundary).sum(-1) > (values_t == boundary).sum(-1)).tolist()
    values, ids = values_t.numpy(), ids_t.numpy()
    order = np.lexsort((ids, -values), axis=-1)  # descending value, then ascending id (a stable sort's order)
    values, ids = np.take_along_axis(values, order, -1), np.take_along_axis(ids, order, -1)
    for row in (row for row, ties in enumerate(spill) if ties):
        values[row], ids[row] = _fill_ties(probs[row], values[row], ids[row], k)
    # taken while the sum of those before it (float32, in order along each row) is below top_p
    before = np.concatenate(
        [np.zeros((len(values), 1), np.float32), np.cumsum(values, axis=-1, dtype=np.float32)[:, :-1]],
        axis=-1,
    )
    below = before < top_p
    counts = np.where(below.all(-1), k, np.argmin(below, axis=-1)).tolist()
    return [
        (torch.from_numpy(values[row, :count].copy()), torch.from_numpy(ids[row, :count].copy()))
        for row, count in enumerate(counts)
    ]


def _fill_ties(
    probs: torch.Tensor, values: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of one row when the value at the boundary also occurs outside the top k:
    those above it, then the boundary's ids from the lowest, in a stable sort's order."""
    boundary = values[-1]
    inside = values > boundary
    tied = (probs == float(boundary)).nonzero().reshape(-1)[: k - int(inside.sum())].numpy()
    values = np.concatenate([values[inside], np.full(len(tied), boundary, dtype=values.dtype)])
    ids = np.concatenate([ids[inside], tied])
    order = np.lexsort((ids, -values))
    return values[order], ids[order]


def random_sampling(logp: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from the full distribution."""
    return int(logp.float().softmax(dim=-1).multinomial(1, generator=generator).item())


def ras_sampling(
    logp: torch.Tensor,
    decoded_tokens: Sequence[int],
    generator: torch.Generator | None = None,
    top_p: float = 0.8,
    top_k: int = 25,
    win_size: int = 10,
    tau_r: float = 0.1,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> int:
    """Nucleus draw; if that token already occurs in the last ``win_size`` decoded tokens at least
    ``win_size * tau_r`` times, ban it and draw from the full remaining distribution instead
    (this is what breaks the loops an LM-based TTS otherwise falls into).  ``candidates``: the
    nucleus of ``logp`` when already computed (:func:`nucleus_batch`)."""
    probs, ids = candidates if candidates is not None else nucleus_candidates(logp, top_p, top_k)
    token = int(ids[probs.multinomial(1, generator=generator)].item())
    window = list(decoded_tokens[-win_size:]) if win_size > 0 else []
    if window.count(token) >= win_size * tau_r:
        banned = logp.float().clone()
        banned[token] = float("-inf")
        token = random_sampling(banned, generator)
    return token


def ras_batch(
    logps: torch.Tensor,
    windows: torch.Tensor,
    generators: Sequence[torch.Generator],
    top_p: float = 0.8,
    top_k: int = 25,
    win_size: int = 10,
    tau_r: float = 0.1,
) -> torch.Tensor:
    """:func:`ras_sampling` for every row of ``logps`` [B, V] at once, on their device, with no
    transfer to the host: the tokens [B] (long, on the device).

    ``windows`` [B, W] (long, -1 where a request has fewer tokens) holds each row's last decoded
    tokens; ``generators`` are one per row, on the device.  Each draw is the exponential race
    (``argmax(p / q)``, ``q ~ Exp(1)``) that ``torch.multinomial`` itself runs for one sample,
    over the nucleus and, for the repetition fallback, over the whole distribution with the
    nucleus's token banned.  Both are drawn for every row so that neither branch needs the host
    and every row consumes the same amount of its generator at every step (which is what lets
    the LM stage rewind a speculative draw).  The nucleus is that of :func:`nucleus_batch`, but
    equal probabilities are not put in id order: a row's distribution is the same, its tokens are
    not those of the host sampler (a different generator draws them anyway)."""
    probs = logps.float().softmax(dim=-1)
    rows, vocab = probs.shape
    k = min(top_k, vocab)
    noise = torch.empty(rows, k + vocab, dtype=probs.dtype, device=probs.device)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    values, ids = probs.topk(k, dim=-1)
    before = torch.nn.functional.pad(values.cumsum(dim=-1)[:, :-1], (1, 0))  # taken before each
    race = torch.where(before < top_p, values / noise[:, :k], -1.0)
    nucleus = ids.gather(1, race.argmax(dim=-1, keepdim=True))  # [B, 1]
    repeats = (windows == nucleus).sum(dim=-1)
    fallback = (probs.scatter(1, nucleus, 0.0) / noise[:, k:]).argmax(dim=-1)
    return torch.where(repeats >= win_size * tau_r, fallback, nucleus[:, 0])


class RasSampler:
    """The default :class:`Sampler`: RAS with the model's parameters and a per-request generator."""

    def __init__(
        self,
        generator: torch.Generator | None = None,
        top_p: float = 0.8,
        top_k: int = 25,
        win_size: int = 10,
        tau_r: float = 0.1,
    ):
        self.generator = generator
        self.top_p, self.top_k, self.win_size, self.tau_r = top_p, top_k, win_size, tau_r
        self._on_device: tuple[torch.device, torch.Generator] | None = None

    @property
    def params(self) -> tuple[float, int, int, float]:
        """What a batch of draws must share (:func:`ras_batch`)."""
        return self.top_p, self.top_k, self.win_size, self.tau_r

    def device_generator(self, device: torch.device) -> torch.Generator:
        """The generator this request's draws on ``device`` use (:func:`ras_batch`): made once,
        seeded from this sampler's own generator, so a seeded request is reproducible there.
        (One sampler per request: the LM stage rewinds a request's generator to undo a draw.)"""
        if self._on_device is None or self._on_device[0] != device:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
            self._on_device = (device, generator)
        return self._on_device[1]

    @classmethod
    def seeded(cls, seed: int, **kwargs) -> RasSampler:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        return cls(gen, **kwargs)

    def __call__(
        self,
        logp: torch.Tensor,
        decoded_tokens: Sequence[int],
        candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> int:
        # Draws happen on CPU so that a CPU generator serves models on any device.
        return ras_sampling(
            logp.detach().to("cpu"),
            decoded_tokens,
            self.generator,
            self.top_p,
            self.top_k,
            self.win_size,
            self.tau_r,
            candidates,
        )
