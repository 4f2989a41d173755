"""Units of the audio delivery path: the engine→loop buffer, realtime pacing, write coalescing and
the per-frame histogram.  The integration tests in test_server.py drive the same code end to end."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from realtime.engines.base import AudioChunk, Cancelled
from realtime.metrics import Histogram
from realtime.session import _Pacer
from realtime.synthesis import AudioBuffer, Finished
from realtime.transport import CorkedTransport


def chunk(n: int) -> AudioChunk:
    return AudioChunk([0.0] * n)


# -- AudioBuffer ----------------------------------------------------------------------------------

async def test_buffer_keeps_order_and_delivers_final_item_when_full():
    buf = AudioBuffer(asyncio.get_running_loop(), capacity_samples=10)
    buf.put(chunk(6), 6)
    buf.put(chunk(6), 6)  # over capacity now: only the next put would block
    buf.put_final(Finished())
    assert buf.buffered_samples == 12
    items = [await buf.get() for _ in range(3)]
    assert [type(i).__name__ for i in items] == ["AudioChunk", "AudioChunk", "Finished"]
    assert buf.buffered_samples == 0


async def test_buffer_consumer_wakes_for_a_put_from_another_thread():
    buf = AudioBuffer(asyncio.get_running_loop(), capacity_samples=100)
    getter = asyncio.create_task(buf.get())
    await asyncio.sleep(0.05)
    assert not getter.done()
    threading.Thread(target=buf.put, args=(chunk(5), 5)).start()
    item = await asyncio.wait_for(getter, 5)
    assert len(item.samples) == 5


async def test_full_buffer_blocks_producer_until_it_drains_to_three_quarters():
    buf = AudioBuffer(asyncio.get_running_loop(), capacity_samples=100)
    for _ in range(5):
        buf.put(chunk(20), 20)  # 100 queued: full
    resumed = threading.Event()

    def producer() -> None:
        buf.put(chunk(20), 20)
        resumed.set()

    t = threading.Thread(target=producer)
    t.start()
    await buf.get()  # 80 left: room, but above the resume mark
    await asyncio.sleep(0.1)
    assert not resumed.is_set()
    await buf.get()  # 60 left: below three quarters
    assert await asyncio.to_thread(resumed.wait, 5)
    t.join()
    assert buf.buffered_samples == 80


async def test_close_wakes_a_blocked_producer_and_a_waiting_consumer():
    loop = asyncio.get_running_loop()
    full = AudioBuffer(loop, capacity_samples=10)
    full.put(chunk(10), 10)
    outcome: list[str] = []

    def producer() -> None:
        try:
            full.put(chunk(10), 10)
            outcome.append("put")
        except Cancelled:
            outcome.append("cancelled")

    t = threading.Thread(target=producer)
    t.start()
    await asyncio.sleep(0.05)
    full.close()
    await asyncio.to_thread(t.join, 5)
    assert outcome == ["cancelled"]
    with pytest.raises(Cancelled):
        await full.get()  # what was queued is dropped
    full.put_final(Finished())  # dropped silently once closed
    with pytest.raises(Cancelled):
        full.put(chunk(1), 1)

    empty = AudioBuffer(loop, capacity_samples=10)
    getter = asyncio.create_task(empty.get())
    await asyncio.sleep(0.05)
    threading.Thread(target=empty.close).start()
    with pytest.raises(Cancelled):
        await asyncio.wait_for(getter, 5)


# -- realtime pacing ------------------------------------------------------------------------------

async def test_pacer_sends_in_batches_never_too_early():
    lead, batch, frame = 0.1, 0.06, 0.02
    pacer = _Pacer(True, lead, batch)
    sent: list[tuple[float, float]] = []  # (frame start on the playback clock, send time)
    sleeps = 0
    for k in range(40):  # 0.8 s of audio
        sleeps += await pacer.wait(k * frame)
        sent.append((k * frame, time.perf_counter()))
    t0 = pacer.t0
    for start, at in sent:
        # earliest allowed: `lead + batch + margin` ahead of playback (a small allowance for the clock)
        assert at >= t0 + start - lead - batch - pacer.margin - 0.002, (start, at - t0)
    # one wake-up per batch, not one per frame (a slow machine only makes this smaller)
    assert sleeps <= (40 * frame - lead) / batch + 2, sleeps
    assert sent[-1][1] - t0 >= 39 * frame - lead - batch - pacer.margin - 0.002  # it did wait for playback


async def test_pacer_disabled_never_waits():
    pacer = _Pacer(False, 0.3, 0.1)
    t = time.perf_counter()
    assert not any([await pacer.wait(k * 0.02) for k in range(100)])
    assert time.perf_counter() - t < 1.0


# -- write coalescing -----------------------------------------------------------------------------

class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_corked_transport_writes_once_per_loop_iteration_in_order():
    real = FakeTransport()
    t = CorkedTransport(real, asyncio.get_running_loop())
    for part in (b"a", b"", b"bc", b"d"):
        t.write(part)
    assert real.writes == [] and t.get_write_buffer_size() == 4
    await asyncio.sleep(0)
    assert real.writes == [b"abcd"]
    t.writelines([b"e", b"f"])
    await asyncio.sleep(0)
    assert real.writes == [b"abcd", b"ef"]
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the real one's


async def test_corked_transport_close_flushes_first_and_abort_drops():
    real = FakeTransport()
    t = CorkedTransport(real, asyncio.get_running_loop())
    t.write(b"last words")
    t.close()
    assert real.writes == [b"last words"] and real.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing more to write
    assert real.writes == [b"last words"]

    real = FakeTransport()
    t = CorkedTransport(real, asyncio.get_running_loop())
    t.write(b"never sent")
    t.abort()
    await asyncio.sleep(0)
    assert real.writes == [] and real.aborted


# -- metrics --------------------------------------------------------------------------------------

def test_histogram_renders_cumulative_buckets():
    h = Histogram("x_seconds", "test", (0.01, 0.1, 1.0))
    for v in (0.0, 0.01, 0.05, 0.5, 3.0):
        h.observe(v)
    lines = h.render()
    assert 'x_seconds_bucket{le="0.01"} 2' in lines  # le is inclusive
    assert 'x_seconds_bucket{le="0.1"} 3' in lines
    assert 'x_seconds_bucket{le="1"} 4' in lines
    assert 'x_seconds_bucket{le="+Inf"} 5' in lines
    assert "x_seconds_count 5" in lines
