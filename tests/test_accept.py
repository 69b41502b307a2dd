"""Connections shared fairly by the workers (``mirror.api.accept``): each takes one connection per wake-up.

Two acceptors on one listening socket stand for two workers (each worker's epoll holds its own descriptor of the
socket the master bound; here two descriptors in one loop). A burst of connections that are all waiting before
either acceptor runs must be split between them; asyncio's own server takes the whole burst on its first wake-up.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import Counter

from aiohttp import web

from mirror.api.accept import Acceptor, FairSite

BURST = 32


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class Served(Counter[str]):
    """Connections made, by acceptor; ``all_in`` is set once the whole burst is."""

    def __init__(self) -> None:
        super().__init__()
        self.all_in = asyncio.Event()

    def protocol(self, name: str) -> asyncio.Protocol:
        served = self

        class Counting(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                served[name] += 1
                if served.total() == BURST:
                    served.all_in.set()
                transport.close()

        return Counting()


async def _burst(port: int) -> list[socket.socket]:
    """BURST connections, all accepted by the kernel (in the listen backlog) before anyone calls accept."""
    clients = []
    for _ in range(BURST):
        client = socket.socket()
        client.connect(("127.0.0.1", port))
        clients.append(client)
    return clients


async def _wait_for(served: Served) -> None:
    async with asyncio.timeout(10):
        await served.all_in.wait()


async def test_a_burst_of_connections_is_split_between_the_workers() -> None:
    loop = asyncio.get_running_loop()
    listener = _listening()
    served = Served()
    clients = await _burst(listener.getsockname()[1])
    acceptors = [
        Acceptor(loop, sock, functools.partial(served.protocol, name), None)
        for name, sock in (("one", listener.dup()), ("two", listener.dup()))
    ]
    try:
        await _wait_for(served)
        assert served == {"one": BURST // 2, "two": BURST // 2}
    finally:
        for acceptor in acceptors:
            acceptor.close()
        for client in clients:
            client.close()
        listener.close()


async def test_asyncio_alone_gives_the_whole_burst_to_the_first_worker_awake() -> None:
    """Why ``Acceptor`` exists: the same burst through asyncio's servers lands on one of them."""
    loop = asyncio.get_running_loop()
    listener = _listening()
    served = Served()
    clients = await _burst(listener.getsockname()[1])
    servers = [
        await loop.create_server(functools.partial(served.protocol, name), sock=sock)
        for name, sock in (("one", listener.dup()), ("two", listener.dup()))
    ]
    try:
        await _wait_for(served)
        assert sorted(served.values()) == [BURST]
    finally:
        for server in servers:
            server.close()
        for client in clients:
            client.close()
        listener.close()


async def test_a_fair_site_serves_the_app_and_stops_accepting_when_stopped() -> None:
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    listener = _listening()
    port = listener.getsockname()[1]
    await FairSite(runner, listener).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello")
        writer.close()
    finally:
        await runner.cleanup()
    late = socket.create_connection(("127.0.0.1", port))  # the kernel still queues it: nobody accepts any more
    late.settimeout(0.3)
    late.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert late.recv(100) == b""
    except TimeoutError:
        pass
    finally:
        late.close()
        listener.close()
