"""Streaming sample-rate conversion for engine audio (soxr).

Quality is soxr's "HQ" (20-bit precision, flat to -0.01 dB up to 91% of the lower Nyquist).  A
linear-phase filter has to see some future input before it can emit a sample, so a stream holds back
a tail of audio until more arrives or :meth:`StreamResampler.flush` is called.  Measured with soxr
1.1.0, 20 ms input chunks, in milliseconds of audio held (mean / max):

    22050 -> 48000, 24000, 16000   HQ 23 / 42    MQ 23 / 43    LQ 1 / 1 (but -22 dB at 10 kHz)
    22050 -> 8000                  HQ 46 / 80    MQ 47 / 82    LQ 22 / 43 (-8 dB at 3.4 kHz)
    24000 -> 16000, 48000          HQ 21 / 38    MQ 21 / 39

"MQ" costs the same delay as "HQ" for less precision, "LQ" rolls off audibly inside the passband and
"QQ" (cubic, ~0 delay) does not filter at all (a 5 kHz tone folds into 22050 -> 8000 at -0.5 dB), so
"HQ" is the trade we take: the first chunk of an utterance still comes out at once, and the held tail
only eats into the client's playout buffer, never into time-to-first-audio.  Asking for the engine's
native rate skips resampling entirely and holds nothing.  Numbers: ``python benchmarks/codec_cost.py``.
"""

from __future__ import annotations

import numpy as np
import soxr

DEFAULT_QUALITY = "HQ"


class StreamResampler:
    """Mono float32 resampler fed in arbitrary chunks; output length after :meth:`flush` is
    ``round(n_in * out_rate / in_rate)`` (soxr trims its own delay)."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = DEFAULT_QUALITY) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self.passthrough = self.in_rate == self.out_rate
        self._stream = None if self.passthrough else soxr.ResampleStream(
            self.in_rate, self.out_rate, 1, dtype="float32", quality=quality
        )
        self._flushed = False

    def process(self, x: np.ndarray) -> np.ndarray:
        """Resample the next chunk; may return fewer samples than the rate ratio suggests (held tail)."""
        if self._flushed:
            raise RuntimeError("StreamResampler.process() after flush()")
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
        if self._stream is None:
            return x.copy()
        if x.size == 0:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(x)

    def drain(self) -> np.ndarray:
        """Emit the held tail now and start afresh, keeping the stream usable (protocol ``flush``).

        The tail is filtered as if the input stopped, and what comes next starts with an empty filter
        history, so a drain in the middle of loud audio leaves a small transient; at the pause that
        a text flush normally ends on, it is inaudible.  Each drained segment is length-exact.
        """
        if self._flushed:
            raise RuntimeError("StreamResampler.drain() after flush()")
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return tail

    def flush(self) -> np.ndarray:
        """Emit the held tail; the stream is finished afterwards."""
        if self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
