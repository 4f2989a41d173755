"""Streaming sample-rate conversion for engine audio (soxr).

Quality is soxr's "HQ" (20-bit precision, flat to -0.01 dB up to 91% of the lower Nyquist).  A
linear-phase filter has to see some future input before it can emit a sample, so a stream holds back
a tail of audio until more arrives or :meth:`StreamResampler.flush` is called.  Measured with soxr
1.1.0, 20 ms input chunks, milliseconds of audio held, mean / max (benchmarks/codec_cost.py):

    pair            QQ        LQ          MQ          HQ          VHQ
    22050 -> 48000  0.1/0.1   0.9/0.9    23.5/42.6   23.1/41.7   23.5/40.3
    22050 -> 16000  0.1/0.1  11.7/21.7   23.1/40.9   23.2/40.0   46.1/83.8
    22050 -> 8000   0.0/0.0  23.1/43.4   46.6/82.2   46.3/80.4   92.2/168.4
    24000 -> 48000  0.1/0.1  10.6/20.4   21.4/39.3   21.1/38.3   21.4/36.8

"MQ" costs the same delay as "HQ" for less precision, "LQ" rolls off audibly inside the passband
(-22 dB at 10 kHz for 22050 -> 48000, -8 dB at 3.4 kHz for 22050 -> 8000), "VHQ" doubles the delay
when downsampling, and "QQ" (cubic, ~0 delay) does not filter at all (a 5 kHz tone folds into
22050 -> 8000 at -0.5 dB).  So "HQ": what is held is only the end of what the engine has produced so
far (a chunk is hundreds of ms), so time to first audio does not change; the tail eats into the
client's playout buffer instead.  Asking for the engine's native rate skips resampling and holds
nothing.
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
        self._stream = (
            None
            if self.passthrough
            else soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality=quality)
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
