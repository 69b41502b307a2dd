"""Connections shared fairly by the workers of ``mirror serve --workers N``: one ``accept`` per wake-up.

Every worker listens on the one socket the master bound. asyncio's servers accept up to their backlog of
connections each time the socket becomes readable, so the worker that wakes first takes a whole burst: a CI fleet
or a benchmark opening 32 keep-alive connections at once lands them all on one worker while the others idle,
and the host serves at one worker's speed. Here a worker accepts one connection per readiness event and goes
back to its loop; every waiting worker is woken for each connection (the socket is level-triggered in each
epoll), and the one least busy takes it. A worker that finds the connection already taken gets ``EAGAIN`` and
carries on. This is nginx's ``multi_accept off``.

``FairSite`` is an aiohttp site whose server is an ``Acceptor``; ``mirror.workers`` starts one per listening
socket in place of aiohttp's ``SockSite``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from ssl import SSLContext
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)
PAUSE = 1.0  # seconds without accepting after the process ran out of descriptors or memory (as asyncio does)
_GONE = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM)  # the client left before it was accepted: try the next


class Acceptor(asyncio.AbstractServer):
    """Accepts from ``sock`` one connection per readiness event and serves it with ``factory`` (aiohttp's
    ``web.Server``, which tracks its connections for the graceful shutdown)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Any, ssl: SSLContext | None
    ) -> None:
        self._loop, self._sock, self._factory, self._ssl = loop, sock, factory, ssl
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._serving = False
        sock.setblocking(False)
        self.start()

    def start(self) -> None:
        if not self._serving:
            self._serving = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it
        except OSError as exc:
            if exc.errno in _GONE:
                return
            log.warning("accepting connections paused for %g s: %s", PAUSE, exc)  # EMFILE, ENFILE, ENOBUFS, ENOMEM
            self.close()
            self._loop.call_later(PAUSE, self.start)
            return
        conn.setblocking(False)
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl))
        self._handshakes.add(task)
        task.add_done_callback(lambda done: self._connected(done, conn))

    def _connected(self, task: asyncio.Task[Any], conn: socket.socket) -> None:
        self._handshakes.discard(task)
        if task.cancelled() or task.exception() is not None:  # a failed TLS handshake: the client's problem
            conn.close()

    def close(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def start_serving(self) -> None:
        self.start()

    async def serve_forever(self) -> None:
        raise NotImplementedError("served by the worker's own loop")

    async def wait_closed(self) -> None:
        return None


class FairSite(web.SockSite):
    """aiohttp's ``SockSite`` over an ``Acceptor``: the same registration with the runner, the fair accept."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None  # the runner is set up before any site is made
        self._server = Acceptor(asyncio.get_running_loop(), self._sock, server, self._ssl_context)
