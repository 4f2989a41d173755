"""Speech-token sampling: nucleus + repetition-aware sampling (RAS, from VALL-E 2).

Randomness comes from an explicit ``torch.Generator`` (the official code uses torch's global RNG),
so a request is reproducible and concurrent requests do not disturb each other's draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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
    the candidate that crosses ``top_p`` is included.  Probabilities are not renormalised."""
    probs = logp.float().softmax(dim=-1)
    sorted_probs, sorted_ids = probs.sort(descending=True, stable=True)
    head = sorted_probs[:top_k]
    # The running sum is accumulated in float32, one candidate at a time, like the reference does.
    cum = torch.zeros((), dtype=torch.float32)
    count = 0
    for value in head:
        if not (cum < top_p):
            break
        cum = cum + value
        count += 1
    return sorted_probs[:count], sorted_ids[:count]


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
            logp.detach().to("cpu"), decoded_tokens, self.generator,
            self.top_p, self.top_k, self.win_size, self.tau_r,
        )
