"""The WADO-RS part pipeline (``web.wado_stream``, issue 17): one thread produces the parts
ahead of the sender; same order and bytes, a convertible failure skipped, any other error
ends production, the queue bounded by bytes, the thread stopped when the answer ends."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pacsvault.web.wado import WadoError
from pacsvault.web.wado_stream import PartPipeline


async def _drain(pipe: PartPipeline[int, str]) -> list[tuple[int, bytes | None, str]]:
    got: list[tuple[int, bytes | None, str]] = []
    while (entry := await pipe.next()) is not None:
        item, data, error = entry
        got.append((item, data, type(error).__name__ if error is not None else ""))
    return got


def test_parts_in_order_with_a_skippable_failure_and_a_fatal_one() -> None:
    def produce(item: int, syntax: str) -> bytes:
        if item == 2:
            raise WadoError(406, "not convertible")
        if item == 4:
            raise OSError("unreadable")
        return f"{item}:{syntax}".encode() * 1000

    async def run() -> list[tuple[int, bytes | None, str]]:
        pipe: PartPipeline[int, str] = PartPipeline(produce, [(i, "s") for i in range(7)],
                                                    ahead_bytes=1)
        try:
            return await _drain(pipe)
        finally:
            pipe.close()

    got = asyncio.run(run())
    assert [(i, e) for i, _d, e in got] == [(0, ""), (1, ""), (2, "WadoError"),
                                            (3, ""), (4, "OSError")]
    assert got[3][1] == b"3:s" * 1000
    assert got[2][1] is None and got[4][1] is None


def test_empty_and_every_part_when_the_sender_is_slow() -> None:
    async def run() -> tuple[list[tuple[int, bytes | None, str]], list[int]]:
        empty: PartPipeline[int, str] = PartPipeline(lambda i, s: b"x", [])
        assert await empty.next() is None
        pipe: PartPipeline[int, str] = PartPipeline(lambda i, s: bytes([i]) * 10,
                                                    [(i, "s") for i in range(50)])
        got = []
        while (entry := await pipe.next()) is not None:
            got.append((entry[0], entry[1], ""))
            if entry[0] % 10 == 0:
                await asyncio.sleep(0.01)  # the producer runs ahead, then waits
        return got, [g[0] for g in got]

    got, order = asyncio.run(run())
    assert order == list(range(50))
    assert all(data == bytes([i]) * 10 for i, data, _e in got)


def test_the_queue_is_bounded_and_close_stops_the_thread() -> None:
    produced: list[int] = []
    lock = threading.Lock()

    def produce(item: int, syntax: str) -> bytes:
        with lock:
            produced.append(item)
        return b"y" * 100

    async def run() -> None:
        pipe: PartPipeline[int, str] = PartPipeline(produce, [(i, "s") for i in range(100)],
                                                    ahead_bytes=250)
        entry = await pipe.next()
        assert entry is not None and entry[0] == 0
        deadline = time.monotonic() + 5
        while len(produced) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        # 250 bytes ahead: three parts of 100 queued at most, plus the one taken
        assert len(produced) == 4
        pipe.close()
        pipe._thread.join(5)
        assert not pipe._thread.is_alive()
        assert len(produced) == 4

    asyncio.run(run())


@pytest.mark.parametrize("ahead", [1, 1 << 20])
def test_waiting_sender_is_woken_by_each_part(ahead: int) -> None:
    def produce(item: int, syntax: str) -> bytes:
        time.sleep(0.002)  # slower than the sender: the loop waits for each part
        return str(item).encode()

    async def run() -> list[tuple[int, bytes | None, str]]:
        pipe: PartPipeline[int, str] = PartPipeline(produce, [(i, "s") for i in range(20)],
                                                    ahead_bytes=ahead)
        return await asyncio.wait_for(_drain(pipe), 10)

    got = asyncio.run(run())
    assert [d for _i, d, _e in got] == [str(i).encode() for i in range(20)]


def test_an_abandoned_pipeline_stops_and_leaves_an_error() -> None:
    async def run() -> list[tuple[int, bytes | None, str]]:
        pipe: PartPipeline[int, str] = PartPipeline(lambda i, s: b"z" * 10,
                                                    [(i, "s") for i in range(10)],
                                                    abandoned_seconds=0.2)
        first = await pipe.next()
        assert first is not None and first[0] == 0
        pipe._thread.join(5)  # nobody takes the next part: the thread gives up
        assert not pipe._thread.is_alive()
        return await _drain(pipe)

    got = asyncio.run(run())
    # a returning sender gets what was queued, then the cut: never an answer ended short
    assert got == [(1, b"z" * 10, ""), (2, None, "TimeoutError")]
