"""Units of the audio delivery path: the engine→loop buffer, realtime pacing, write coalescing, the
close that becomes an abort, and the per-frame histogram.  The integration tests in test_server.py
drive the same code end to end."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from realtime.engines.base import AudioChunk, Cancelled, Finished
from realtime.metrics import Metrics
from realtime.session import _Pacer
from realtime.synthesis import AudioBuffer
from realtime.transport import ServerTransport


def chunk(n: int) -> AudioChunk:
    return AudioChunk([0.0] * n)


# -- AudioBuffer ----------------------------------------------------------------------------------


async def test_buffer_keeps_order_and_delivers_final_item_when_full():
    buf = AudioBuffer(asyncio.get_running_loop(), capacity_samples=10)
    buf.put(chunk(6), 6)
    buf.put(chunk(6), 6)  # over capacity now: the engine would ask has_room() before more audio
    buf.put(Finished())
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


async def test_full_buffer_has_no_room_until_it_drains_to_three_quarters_then_wakes_the_engine():
    buf = AudioBuffer(asyncio.get_running_loop(), capacity_samples=100)
    wakes: list[str] = []
    buf.set_waker(lambda: wakes.append(threading.current_thread().name))
    for _ in range(5):
        assert buf.has_room()
        assert buf.put(chunk(20), 20)  # 100 queued: full
    assert not buf.has_room()  # the engine computes nothing more for this stream ...
    await buf.get()  # 80 left: below capacity, but above the resume mark
    assert wakes == [] and buf.has_room() is True
    assert buf.put(chunk(20), 20) is not False  # a put never blocks (the engine asked first)
    assert not buf.has_room()
    await buf.get()
    await buf.get()  # 60 left: below three quarters: the engine is told once
    assert len(wakes) == 1 and buf.has_room()
    await buf.get()
    assert len(wakes) == 1  # nobody was waiting any more
    assert buf.buffered_samples == 40


async def test_close_drops_everything_fails_later_puts_and_wakes_both_sides():
    loop = asyncio.get_running_loop()
    full = AudioBuffer(loop, capacity_samples=10)
    woken = threading.Event()
    full.set_waker(woken.set)
    full.put(chunk(10), 10)
    assert not full.has_room()
    await asyncio.to_thread(full.close)
    assert woken.is_set()  # an engine waiting for room learns that the stream is over
    assert full.has_room()  # ... and its next put says so
    assert full.put(chunk(1), 1) is False and full.put(Finished()) is False
    with pytest.raises(Cancelled):
        await full.get()  # what was queued is dropped

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
    def __init__(self, unsent: int = 0) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.unsent = unsent  # bytes the peer has not taken

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
        return 0 if self.aborted else self.unsent

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_corked_transport_writes_once_per_loop_iteration_in_order():
    real = FakeTransport()
    t = ServerTransport(real, asyncio.get_running_loop())
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
    t = ServerTransport(real, asyncio.get_running_loop())
    t.write(b"last words")
    t.close()
    assert real.writes == [b"last words"] and real.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing more to write
    assert real.writes == [b"last words"]

    real = FakeTransport()
    t = ServerTransport(real, asyncio.get_running_loop())
    t.write(b"never sent")
    t.abort()
    await asyncio.sleep(0)
    assert real.writes == [] and real.aborted


async def test_close_with_bytes_the_peer_never_takes_becomes_an_abort():
    stuck = FakeTransport(unsent=3_000_000)  # a client that stopped reading
    ServerTransport(stuck, asyncio.get_running_loop(), close_s=0.1).close()
    assert stuck.closed and not stuck.aborted
    await asyncio.sleep(0.2)
    assert stuck.aborted

    drained = FakeTransport(unsent=0)
    ServerTransport(drained, asyncio.get_running_loop(), close_s=0.05).close()
    await asyncio.sleep(0.1)
    assert drained.closed and not drained.aborted


# -- metrics --------------------------------------------------------------------------------------


def test_histogram_renders_cumulative_buckets():
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    for v in (0.0, 0.001, 0.05, 0.5, 3.0):
        metrics.pacing_lateness.observe(v)
    (family,) = [
        f
        for f in text_string_to_metric_families(metrics.render().decode())
        if f.name == "realtime_paced_send_lateness_seconds"
    ]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 2  # le is inclusive
    assert buckets["0.05"] == 3 and buckets["0.5"] == 4 and buckets["+Inf"] == 5
    assert {s.name: s.value for s in family.samples}["realtime_paced_send_lateness_seconds_count"] == 5
