"""Blob bytes to a client with ``sendfile`` run in worker threads.

``os.sendfile`` releases the GIL, and on loopback and fast networks the kernel's copying is most of the cost of
serving a blob. asyncio's ``loop.sendfile`` makes every call on the event loop's thread, so one core does all of
it however many clients there are. Here a worker thread sends until the socket is full, and the event loop
waits for it to drain: the copying spreads over every core, and a slow client holds no thread.
TLS connections cannot be sent from the raw socket: they keep asyncio's path, as do event loops without
``loop.sendfile`` (uvloop, see ``send_part`` in ``api.blobs``).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

PIECE = 16 << 20  # bytes per job: long transfers take turns with other clients' pieces
SEND_TIMEOUT = 120.0  # seconds a client may accept nothing before it is given up
_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sendfile")


def usable(transport: asyncio.BaseTransport) -> bool:
    """Whether bytes may go straight to this connection's socket (plain TCP, not TLS)."""
    return transport.get_extra_info("sslcontext") is None and transport.get_extra_info("socket") is not None


def _send_some(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """Send until ``count`` bytes are out or the socket is full; never waits (a slow client holds no thread)."""
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            break
        if n == 0:
            raise ConnectionResetError("the file ended before the bytes promised to the client")
        sent += n
    return sent


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            await ready
    finally:
        loop.remove_writer(fd)


async def send_file(transport: asyncio.Transport, file: IO[Any], offset: int, count: int) -> None:
    """Send ``count`` bytes of ``file`` from ``offset``; the caller has checked ``usable(transport)``. Raises
    ConnectionError when the client goes away, TimeoutError when it accepts nothing for SEND_TIMEOUT."""
    sock = transport.get_extra_info("socket")
    if transport.is_closing() or sock is None:
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    if transport.get_write_buffer_size():  # the headers are still buffered (a slow client): asyncio's way
        await loop.sendfile(transport, file, offset, count)
        return
    # Sent on a duplicate of the socket's descriptor: if the client goes away and the event loop closes the
    # connection meanwhile, that number cannot be reused for another client under a thread's feet, and waiting
    # for it to take more does not collide with the transport's own registration in the selector.
    sock_fd, file_fd = os.dup(sock.fileno()), file.fileno()
    try:
        while count > 0:
            piece = min(count, PIECE)
            sent = await loop.run_in_executor(_executor, _send_some, sock_fd, file_fd, offset, piece)
            offset += sent
            count -= sent
            if sent < piece:
                await _writable(loop, sock_fd)
    finally:
        os.close(sock_fd)
