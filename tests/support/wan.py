"""A WAN-shaped link on loopback: a TCP proxy in front of one upstream that caps the bandwidth and adds a delay.

This kernel has ``tbf`` but no ``netem`` (no added delay), so the link is a small asyncio proxy instead: every
connection through it shares one token bucket per direction (one full-duplex link, ``rate`` bytes per second each
way: 32 clients behind it share the rate as the runners behind one NAT share theirs), every chunk is delivered
``delay`` seconds after it was read (so a round trip costs ``2 * delay``), and opening a connection costs one round
trip, as TCP's handshake does. The bytes that cross the link are counted in each direction: the figure a
benchmark reports, rather than one it assumes.

It is fast enough not to be the bottleneck below its cap: reads of up to 256 KiB, no per-byte Python work, and a
scheduled delivery time per chunk instead of a timer per byte. Memory is bounded: a direction of a connection
holds at most ``MAX_QUEUED`` bytes in flight before it stops reading.

``Link`` runs its own event loop on a thread, so synchronous code (the benchmark) can start it and read its
counters; ``LinkServer`` is the same link for code that already has a loop (a test)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import threading
import time
from dataclasses import dataclass

MiB = 1 << 20
READ_SIZE = 256 * 1024
MAX_QUEUED = 8 * MiB  # per direction of a connection: what it reads ahead of delivery


@dataclass(frozen=True)
class Counters:
    """Bytes that crossed the link: ``down`` from the upstream to its clients, ``up`` the other way."""

    down: int
    up: int
    connections: int

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.down - other.down, self.up - other.up, self.connections - other.connections)


class TokenBucket:
    """One direction of the link: ``rate`` bytes per second shared by every connection, with a burst of
    ``burst`` bytes. A taker reserves its bytes at the end of the queue of reservations (first come, first
    served) and waits until the bucket has paid for them, so the long-run rate is exact whatever the timer's
    resolution. ``rate`` 0 means no cap."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst_seconds = burst / rate if rate else 0.0
        self._paid_until = 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._paid_until = max(self._paid_until, now) + n / self.rate
        wait = self._paid_until - self.burst_seconds - now
        if wait > 0:
            await asyncio.sleep(wait)


class _Pipe:
    """One direction of one connection: read, pay the bucket, queue with a due time, deliver when due."""

    def __init__(
        self,
        link: LinkServer,
        source: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        writer: asyncio.StreamWriter,
        down: bool,
    ):
        self.link, self.writer, self.down = link, writer, down
        self.reader, self.source = source
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.data = asyncio.Event()  # set when a chunk is queued or the reading ends
        self.space = asyncio.Event()  # set when a chunk is delivered or the delivering ends
        self.reading = self.delivering = True

    async def run(self) -> None:
        deliver = asyncio.create_task(self._deliver())
        try:
            await self._read()
        finally:
            self.reading = False
            self.data.set()
        await deliver

    async def _read(self) -> None:
        bucket = self.link.down_bucket if self.down else self.link.up_bucket
        while self.delivering:
            if self.queued >= MAX_QUEUED:
                self.space.clear()
                await self.space.wait()
                continue
            try:
                chunk = await self.reader.read(READ_SIZE)
            except OSError:
                return
            if not chunk:
                return
            await bucket.take(len(chunk))
            self.link.count(len(chunk), self.down)
            self.queue.append((time.monotonic() + self.link.delay, chunk))
            self.queued += len(chunk)
            self.data.set()

    async def _deliver(self) -> None:
        try:
            while self.queue or self.reading:
                if not self.queue:
                    self.data.clear()
                    await self.data.wait()
                    continue
                due, chunk = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.queue.popleft()
                self.queued -= len(chunk)
                self.space.set()
                self.writer.write(chunk)
                await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except OSError:
            self.source.transport.abort()  # the receiving side is gone: drop the sending side too
        finally:
            self.delivering = False
            self.space.set()


class LinkServer:
    """The link on the running event loop: ``await start()``, then connect to ``port``; ``close()`` at the end."""

    def __init__(self, target: tuple[str, int], rate: float, delay: float):
        self.target = target
        self.delay = delay
        # A burst of 20 ms of the rate (256 KiB at least): a timer that fires late on a busy machine costs the
        # link nothing, as long as it is less late than that.
        burst = max(256 * 1024, int(rate * 0.02))
        self.down_bucket = TokenBucket(rate, burst)
        self.up_bucket = TokenBucket(rate, burst)
        self.down = self.up = self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def count(self, n: int, down: bool) -> None:
        if down:
            self.down += n
        else:
            self.up += n

    def counters(self) -> Counters:
        return Counters(self.down, self.up, self.connections)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=2 * READ_SIZE)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            if self.delay:
                await asyncio.sleep(2 * self.delay)  # the handshake's round trip
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target, limit=2 * READ_SIZE)
            for end in (client_writer, upstream_writer):
                end.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(
                _Pipe(self, (client_reader, client_writer), upstream_writer, down=False).run(),
                _Pipe(self, (upstream_reader, upstream_writer), client_writer, down=True).run(),
            )
        except OSError:
            pass
        finally:
            for opened in (client_writer, upstream_writer):
                if opened is not None:
                    opened.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Link:
    """A ``LinkServer`` on its own thread and event loop, for synchronous callers: ``url`` is the link's end."""

    def __init__(self, target: tuple[str, int], rate: float, delay: float):
        self.rate, self.delay = rate, delay
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wan-link", daemon=True)
        self._thread.start()
        self.server = LinkServer(target, rate, delay)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{self.server.port}"

    def counters(self) -> Counters:
        return self.server.counters()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
