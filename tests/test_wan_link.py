"""The benchmark's WAN-shaped link (``tests.support.wan``): its rate is its cap, shared by all connections; it
adds its delay each way and a round trip to open a connection; it counts the bytes that cross it."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.wan import LinkServer

MB = 1_000_000


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The far end: each 8-byte request asks for that many bytes back (0 echoes one byte)."""
    try:
        while request := await reader.read(8):
            (n,) = struct.unpack("!Q", request)
            if not n:
                writer.write(b"x")
            block = bytes(min(n, 1 << 20))
            while n > 0:
                writer.write(block[:n])
                await writer.drain()
                n -= len(block)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
async def far_end() -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    yield "127.0.0.1", int(server.sockets[0].getsockname()[1])
    server.close()


async def _fetch(port: int, n: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack("!Q", n))
    got = 0
    while got < n:
        chunk = await reader.read(1 << 20)
        assert chunk, f"closed after {got} of {n} bytes"
        got += len(chunk)
    writer.close()
    return got


async def test_rate_is_the_cap_shared_by_all_connections(far_end: tuple[str, int]) -> None:
    link = LinkServer(far_end, rate=20 * MB, delay=0.005)
    await link.start()
    try:
        started = time.monotonic()
        got = await asyncio.gather(*(_fetch(link.port, 10 * MB) for _ in range(4)))
        rate = sum(got) / (time.monotonic() - started)
    finally:
        await link.close()
    assert 0.9 * 20 * MB <= rate <= 1.1 * 20 * MB, f"{rate / MB:.1f} MB/s through a 20 MB/s link"


async def test_delay_each_way_and_a_round_trip_to_connect(far_end: tuple[str, int]) -> None:
    delay = 0.05
    link = LinkServer(far_end, rate=100 * MB, delay=delay)
    await link.start()
    try:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        trips = []
        for _ in range(3):
            writer.write(struct.pack("!Q", 0))
            assert await reader.readexactly(1) == b"x"
            trips.append(time.monotonic() - started)
            started = time.monotonic()
        writer.close()
    finally:
        await link.close()
    first, *rest = trips  # the first exchange also pays for the handshake: two round trips
    assert 4 * delay <= first < 4 * delay + 0.15, trips
    assert all(2 * delay <= t < 2 * delay + 0.15 for t in rest), trips


async def test_counts_the_bytes_each_way(far_end: tuple[str, int]) -> None:
    link = LinkServer(far_end, rate=0, delay=0)  # uncapped
    await link.start()
    try:
        sizes = [1, 3 * MB + 17, 5 * MB]
        assert await asyncio.gather(*(_fetch(link.port, n) for n in sizes)) == sizes
        counters = link.counters()
    finally:
        await link.close()
    assert (counters.down, counters.up, counters.connections) == (sum(sizes), 8 * len(sizes), len(sizes))
