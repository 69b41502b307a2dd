"""aiohttp applications served on loopback from a thread with its own event loop, for synchronous tests that speak
raw HTTP (a fuzzer sends request lines an HTTP client library would normalise or refuse), and a raw HTTP/1.1
exchange over one socket."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class ServingThread:
    """An event loop in a daemon thread; ``serve(make_app)`` builds the application on that loop (where its
    locks and sessions must live) and serves it on a free loopback port. ``close()`` cleans every app up."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, make_app: Callable[[], web.Application]) -> int:
        """Serve the app ``make_app()`` returns (called on the loop); its port on 127.0.0.1."""

        async def start() -> int:
            runner = web.AppRunner(make_app(), access_log=None)
            await runner.setup()
            self._runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return int(runner.addresses[0][1])

        return self.call(start())

    def close(self) -> None:
        async def stop() -> None:
            for runner in reversed(self._runners):
                await runner.cleanup()
            # Handlers of connections the cleanup closed (a client that went quiet mid-body) end here, not
            # with the loop.
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            if not self._thread.is_alive():
                self.loop.close()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def exchange(port: int, raw: bytes, timeout: float, half_close: bool = False) -> Answer:
    """Send ``raw`` (a whole request, ``Connection: close``) to 127.0.0.1:``port`` and read one answer, each socket
    operation bounded by ``timeout`` (``TimeoutError`` if the server hangs). ``half_close``: shut the sending side
    after the request, as a client that promised more body than it sends and gave up."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        method = raw.split(b" ", 1)[0].decode("ascii")
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read()
        return Answer(response.status, response.headers, body)
