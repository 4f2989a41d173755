"""Speech-token sampling: nucleus + repetition-aware sampling (RAS, from VALL-E 2).

Randomness comes from an explicit ``torch.Generator`` (the official code uses torch's global RNG),
so a request is reproducible and concurrent requests do not disturb each other's draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

__all__ = ["Sampler", "RasSampler", "nucleus_candidates", "ras_sampling", "random_sampling"]


class Sampler(Protocol):
    """Chooses the next speech token from ``logp`` [V] (log-probabilities, masked ids at -inf)
    given the tokens generated so far in this request."""

    def __call__(self, logp: torch.Tensor, decoded_tokens: Sequence[int]) -> int: ...


def nucleus_candidates(
    logp: torch.Tensor, top_p: float = 0.8, top_k: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [n], ids [n]) of the nucleus: the most probable ids, taken in stable descending order
    while the probability already taken is below ``top_p`` and fewer than ``top_k`` are taken, so
    the candidate that crosses ``top_p`` is included.  Probabilities are not renormalised.

    The reference sorts the whole vocabulary (stable, descending) and sums candidates one at a
    time in float32; this gives the same candidates from a ``topk`` (a full sort of 6561 ids costs
    30x more, and the LM stage pays it for every request at every step): ties are put in id order,
    ties at the boundary are filled from the lowest ids, and the running sum is a float32 cumsum.
    """
    probs = logp.float().softmax(dim=-1)
    k = min(top_k, probs.shape[-1])
    values, ids = probs.topk(k)
    values, ids = values.numpy(), ids.numpy()
    boundary = values[-1]
    ties = int((probs == float(boundary)).sum())
    if ties > int((values == boundary).sum()):  # equal values beyond the top k: the lowest ids win
        inside = values > boundary
        tied = (probs == float(boundary)).nonzero().reshape(-1)[: k - int(inside.sum())].numpy()
        values = np.concatenate([values[inside], np.full(len(tied), boundary, dtype=values.dtype)])
        ids = np.concatenate([ids[inside], tied])
    order = np.lexsort((ids, -values))  # descending value, then ascending id (a stable sort's order)
    values, ids = values[order], ids[order]
    # taken while the sum of those before it (float32, in order) is below top_p
    before = np.concatenate([[np.float32(0)], np.cumsum(values, dtype=np.float32)[:-1]])
    count = int(np.argmin(before < top_p)) if not (before < top_p).all() else len(before)
    return torch.from_numpy(values[:count].copy()), torch.from_numpy(ids[:count].copy())


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
) -> int:
    """Nucleus draw; if that token already occurs in the last ``win_size`` decoded tokens at least
    ``win_size * tau_r`` times, ban it and draw from the full remaining distribution instead
    (this is what breaks the loops an LM-based TTS otherwise falls into)."""
    probs, ids = nucleus_candidates(logp, top_p, top_k)
    token = int(ids[probs.multinomial(1, generator=generator)].item())
    window = list(decoded_tokens[-win_size:]) if win_size > 0 else []
    if window.count(token) >= win_size * tau_r:
        banned = logp.float().clone()
        banned[token] = float("-inf")
        token = random_sampling(banned, generator)
    return token


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

    @classmethod
    def seeded(cls, seed: int, **kwargs) -> RasSampler:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        return cls(gen, **kwargs)

    def __call__(self, logp: torch.Tensor, decoded_tokens: Sequence[int]) -> int:
        # Draws happen on CPU so that a CPU generator serves models on any device.
        return ras_sampling(
            logp.detach().to("cpu"),
            decoded_tokens,
            self.generator,
            self.top_p,
            self.top_k,
            self.win_size,
            self.tau_r,
        )
