"""Blob bytes to a client: sendfile in worker threads (``Sender``), and the streaming of a blob that is still
arriving from its upstream (``stream_fetch``: the growing temp file, sent as the fetch advances).

``os.sendfile`` releases the GIL, and on loopback and fast networks the kernel's copying is most of the cost of
serving a blob. asyncio's ``loop.sendfile`` makes every call on the event loop's thread, so one core does all of
it however many clients there are. Here a worker thread sends until the socket is full, and the event loop
waits for it to drain: the copying spreads over every core, and a slow client holds no thread. The threads are
the app's (``SENDER``, shut down by ``Sender.lifecycle`` in ``app.cleanup_ctx``), not the module's.
TLS connections cannot be sent from the raw socket: they keep asyncio's path, as do event loops without
``loop.sendfile`` (uvloop, see ``send_part``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from aiohttp import web

from mirror.api.conditional import blob_range
from mirror.api.keys import METRICS, STORE
from mirror.oci.reference import Digest, Repo
from mirror.pull.inflight import FetchState

log = logging.getLogger(__name__)

PIECE = 16 << 20  # bytes per job: long transfers take turns with other clients' pieces
SEND_TIMEOUT = 120.0  # seconds a client may accept nothing before it is given up
SEND_THREADS = 8
READ_CHUNK = 1 << 20  # bytes per read when the event loop cannot sendfile
# A client that has caught up with a fetch waits up to GATHER_WAIT for SEND_STEP more bytes before its next
# sendfile: a herd of clients on a fast fetch then makes a quarter of the calls (each one registers and
# unregisters the socket with epoll), while a slow upstream delays bytes by at most GATHER_WAIT.
SEND_STEP = 4 << 20
GATHER_WAIT = 0.02


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


class Sender:
    """The worker threads that run sendfile; one per app, created in ``app.create_app`` (``SENDER``)."""

    def __init__(self, threads: int = SEND_THREADS):
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sendfile")
        self.closed = False
        self.loops_without_sendfile: set[type] = set()  # event loop classes without loop.sendfile (uvloop)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """``app.cleanup_ctx``: the threads end with the app."""
        yield
        self.closed = True
        await asyncio.to_thread(self._executor.shutdown, cancel_futures=True)

    async def send_file(self, transport: asyncio.Transport, file: IO[Any], offset: int, count: int) -> None:
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
                sent = await loop.run_in_executor(self._executor, _send_some, sock_fd, file_fd, offset, piece)
                offset += sent
                count -= sent
                if sent < piece:
                    await _writable(loop, sock_fd)
        finally:
            os.close(sock_fd)


SENDER = web.AppKey("sender", Sender)  # here, not in api.keys: keys is imported by this module


def blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
    }


async def stream_fetch(
    request: web.Request, repo: Repo | None, digest: Digest, fetch: FetchState
) -> web.StreamResponse:
    """Send a blob that is still arriving: read the temp file up to what the fetch has written, wait for more,
    repeat; the last byte of the answer (whole blob or range) only after the digest is verified. If the fetch fails, the connection is cut, so the client sees a short body,
    never a complete wrong one. ``repo`` None: a replica following the fetch (``api.peer``), whose bytes are not
    counted as served to clients."""
    assert fetch.size is not None
    rng = blob_range(request, digest, fetch.size)
    start, end = rng if rng is not None else (0, fetch.size)
    resp = web.StreamResponse(status=206 if rng else 200, headers=blob_headers(digest))
    resp.content_length = end - start
    resp.etag = str(digest)
    if rng is not None:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{fetch.size}"
    await resp.prepare(request)
    if request.method == "HEAD" or end == start:
        await resp.write_eof()
        return resp
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    fileobj = await _open_growing(request, fetch)
    if fileobj is None:
        transport.abort()
        return resp
    fetch.clients += 1
    try:
        offset = start
        while offset < end:
            await _wait_sendable(fetch, offset, offset > start, end)
            if fetch.error is not None and not fetch.verified:  # verified bytes are right, even unstored
                log.warning("cutting client off: fetch of %s failed: %s", digest, fetch.error)
                transport.abort()
                return resp
            available = min(fetch.readable(), _sendable_end(fetch, end))
            if available > offset:
                await send_part(request, transport, resp, fileobj, offset, available - offset)
                if repo is not None:
                    request.app[METRICS].blob_bytes_served.labels(repo.registry, "upstream").inc(available - offset)
                    request.app[METRICS].repos.served(str(repo), "upstream", available - offset)
                offset = available
    finally:
        fetch.clients -= 1
        await asyncio.to_thread(fileobj.close)
    await resp.write_eof()
    return resp


async def _open_growing(request: web.Request, fetch: FetchState) -> IO[bytes] | None:
    """The fetch's growing file from the store; None if it is gone for good (the fetch failed)."""
    assert fetch.temp_path is not None
    store = request.app[STORE]
    try:
        return await asyncio.to_thread(store.open_growing, fetch.temp_path, fetch.digest)
    except FileNotFoundError:
        # Either the fetch failed and removed its temp file, or it is between renaming the temp file into the
        # store and marking itself finished (small blobs hit this): wait for the outcome, then decide.
        await fetch.wait_done()
    try:
        return await asyncio.to_thread(store.open_growing, fetch.temp_path, fetch.digest)
    except FileNotFoundError:
        return None


async def _wait_sendable(fetch: FetchState, offset: int, gather: bool, end: int) -> None:
    """Wait until bytes from ``offset`` of a range ending at ``end`` may be sent, or the fetch ended.

    A range's last byte is sent only once the whole blob is verified: ``Fetch.readable`` holds back the blob's
    last byte, which protects only ranges that include it; a range ending earlier would otherwise be completed
    with bytes whose digest is not yet known to be right."""
    if offset >= _sendable_end(fetch, end):
        while not (fetch.verified or fetch.done):  # the digest check (the publish after it holds nobody back)
            await fetch.wait_beyond(fetch.readable())
        return
    await fetch.wait_beyond(offset)
    if gather and fetch.readable() - offset < SEND_STEP:
        await _gather_more(fetch, min(offset + SEND_STEP, _sendable_end(fetch, end)))


def _sendable_end(fetch: FetchState, end: int) -> int:
    """Where the bytes of a range ending at ``end`` may be sent up to now: all of it once the blob is verified, all
    but its last byte before."""
    return end if fetch.verified else end - 1


async def _gather_more(fetch: FetchState, target: int) -> None:
    """Wait until ``target`` bytes are readable, the fetch ended, or GATHER_WAIT passed, whichever comes first."""
    try:
        async with asyncio.timeout(GATHER_WAIT):
            await fetch.wait_beyond(target - 1)
    except TimeoutError:
        pass


async def send_part(
    request: web.Request,
    transport: asyncio.Transport,
    resp: web.StreamResponse,
    fileobj: IO[bytes],
    offset: int,
    count: int,
) -> None:
    """``count`` bytes of the file from ``offset`` to the client: sendfile in the app's threads where the
    connection allows, else the loop's sendfile, else (uvloop has no ``loop.sendfile``) reads of up to 1 MiB in a
    thread, so memory stays bounded."""
    sender = request.app[SENDER]
    if usable(transport):
        await sender.send_file(transport, fileobj, offset, count)
        return
    loop = asyncio.get_running_loop()
    if type(loop) not in sender.loops_without_sendfile:
        try:
            await loop.sendfile(transport, fileobj, offset, count)
            return
        except NotImplementedError:  # raised before any byte is sent
            sender.loops_without_sendfile.add(type(loop))
    fd = fileobj.fileno()
    while count > 0:
        data = await asyncio.to_thread(os.pread, fd, min(count, READ_CHUNK), offset)
        if not data:
            raise ConnectionResetError("temp file shorter than the fetch reported")
        await resp.write(data)
        offset += len(data)
        count -= len(data)
