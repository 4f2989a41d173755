"""G.711 μ-law and A-law companding in numpy, bit-exact to the ITU-T G.191 reference coder.

``audioop`` is gone from Python 3.13, so we do the arithmetic ourselves.  The one choice that the
plain G.711 tables leave open is how a two's-complement negative sample is folded onto a magnitude;
the ITU reference software takes the one's complement (``~x``), so -1 and 0 share the smallest step.
FFmpeg's ``pcm_mulaw``/``pcm_alaw`` fold with ``-x`` instead and therefore differ from us (and from
the ITU coder) on some negative samples that sit exactly on a decision level.
"""

from __future__ import annotations

import numpy as np

_MULAW_BIAS = 33  # in the 14-bit domain: moves every segment edge onto a power of two
_MULAW_MAX = 0x1FFF


def _fold(x: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude in the law's uniform domain, non-negative mask) for int16 samples."""
    x = np.asarray(x, dtype=np.int16).astype(np.int32)
    positive = x >= 0
    magnitude = np.where(positive, x, ~x) >> shift
    return magnitude, positive


def _top_bit(v: np.ndarray) -> np.ndarray:
    """floor(log2(v)) for v >= 1, as int32."""
    return np.frexp(v.astype(np.float64))[1].astype(np.int32) - 1


def linear_to_ulaw(x: np.ndarray) -> np.ndarray:
    """int16 samples -> μ-law bytes (uint8), 8 bits per sample."""
    magnitude, positive = _fold(x, 2)  # 14-bit uniform PCM
    biased = np.minimum(magnitude + _MULAW_BIAS, _MULAW_MAX)  # 33 ..= 8191
    segment = _top_bit(biased) - 5  # biased lies in [32 << s, 64 << s)
    mantissa = (biased >> (segment + 1)) & 0xF
    code = 0x7F - ((segment << 4) | mantissa)  # μ-law transmits the inverted code
    return (code | np.where(positive, 0x80, 0)).astype(np.uint8)


def linear_to_alaw(x: np.ndarray) -> np.ndarray:
    """int16 samples -> A-law bytes (uint8), with the even bits inverted as G.711 requires."""
    magnitude, positive = _fold(x, 4)  # 12 bits: A-law's first two segments share one step
    segment = np.maximum(_top_bit(np.maximum(magnitude, 1)) - 3, 0)  # 0 for magnitudes < 16
    mantissa = np.where(segment == 0, magnitude, magnitude >> np.maximum(segment - 1, 0)) & 0xF
    code = (segment << 4) | mantissa
    return ((code | np.where(positive, 0x80, 0)) ^ 0x55).astype(np.uint8)
