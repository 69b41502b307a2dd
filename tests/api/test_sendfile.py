"""Blob bytes go out by ``sendfile`` from worker threads: many clients at once, slow clients, and clients that
leave half-way must neither stall the others nor leak a descriptor."""

from __future__ import annotations

import asyncio
import os
import socket

from tests.conftest import MirrorClient, fetches_done
from tests.fakes.registry import FakeRegistry

MiB = 1 << 20


async def cached_blob(mirror: MirrorClient, fake: FakeRegistry, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    digest = fake.add_blob(data)
    path = f"/v2/library/big/blobs/{digest}"
    resp = await mirror.get(path)
    assert await resp.read() == data
    await fetches_done(mirror)  # stored (its temp file closed) just after the client had every byte
    return path, data


async def stalled_client(mirror: MirrorClient, path: str) -> asyncio.StreamWriter:
    """Asks for the blob and then reads nothing: the server's socket fills and stays full."""
    reader, writer = await asyncio.open_connection(mirror.server.host, mirror.server.port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    await writer.drain()
    await reader.read(1)  # the answer has started
    return writer


async def test_stalled_clients_do_not_hold_up_the_others(mirror_and_fake: tuple[MirrorClient, FakeRegistry]) -> None:
    mirror, fake = mirror_and_fake
    path, data = await cached_blob(mirror, fake, 32 * MiB)
    stalled = [await stalled_client(mirror, path) for _ in range(12)]  # more than the sending threads
    try:
        for _ in range(3):
            resp = await asyncio.wait_for(mirror.get(path), 10)
            assert await asyncio.wait_for(resp.read(), 20) == data
        ranged = await mirror.get(path, headers={"Range": f"bytes={MiB}-"})
        assert ranged.status == 206 and await ranged.read() == data[MiB:]
    finally:
        for writer in stalled:
            writer.close()


async def test_clients_leaving_half_way_leave_no_descriptor_behind(
    mirror_and_fake: tuple[MirrorClient, FakeRegistry],
) -> None:
    mirror, fake = mirror_and_fake
    path, data = await cached_blob(mirror, fake, 16 * MiB)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        reader, writer = await asyncio.open_connection(mirror.server.host, mirror.server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
        await reader.readexactly(MiB)
        writer.transport.abort()  # gone, with most of the blob unsent
    for _ in range(100):
        if len(os.listdir("/proc/self/fd")) <= before + 2:
            break
        await asyncio.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    resp = await mirror.get(path)
    assert await resp.read() == data
