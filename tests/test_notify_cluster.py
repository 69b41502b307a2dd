"""Webhooks with ``[cluster]``: each endpoint's queue in a real Redis shared by notifiers standing for replicas, a
real aiohttp server as the receiver. Each event is sent once whichever replica it was published on, in order per
replica; the events of a replica that stops, or is killed, are sent by another; a receiver that is down gets them
once it is up, none twice; the bound drops the oldest, counted; a Redis out of reach never fails a publish."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from mirror.metrics import Metrics
from mirror.notify import Endpoint, Event, EventQueue, Notifier, RequestInfo
from mirror.storage.cluster import RedisLink, key
from mirror.storage.redisqueue import RedisQueue
from tests.support.ops import eventually, free_port
from tests.support.plain_http import OCI_MANIFEST
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture

HOLD = 1.0  # seconds a killed replica's lock outlives it (10 s in service)
POLL = 0.05  # seconds between tries of another replica's lock (1 s in service)
WITHIN = 30.0  # seconds any wait of these tests may take
ROOT = Path(__file__).resolve().parent.parent  # the checkout, for the killed replica's PYTHONPATH


@dataclass
class Receiver:
    """The webhook endpoint: records the events it accepted and how many requests it had at once at most; refuses
    (503) its first ``refuse_first`` requests; while ``hold`` is set and not yet released, requests wait; each takes
    ``delay`` seconds."""

    url: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    refuse_first: int = 0
    hold: asyncio.Event | None = None
    delay: float = 0.0
    busy: int = 0
    most_at_once: int = 0
    seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.busy += 1
        self.most_at_once = max(self.most_at_once, self.busy)
        self.seen.set()  # arrived (waiters of ``attempts``), and again once answered
        try:
            if self.hold is not None:
                await self.hold.wait()
            await asyncio.sleep(self.delay)
            if self.attempts <= self.refuse_first:
                return web.Response(status=503)
            self.events.extend((await request.json())["events"])
            return web.Response(status=200)
        finally:
            self.busy -= 1
            self.seen.set()

    async def wait_for(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(WITHIN):
            while not done():
                self.seen.clear()
                await self.seen.wait()

    def tags(self) -> list[str]:
        return [e["target"]["tag"] for e in self.events]


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> Receiver:
    receiver = Receiver()
    path = f"/hook/{secrets.token_hex(4)}"  # an endpoint (so a Redis queue) of this test's own
    app = web.Application()
    app.router.add_post(path, receiver.handle)
    server: TestServer = await aiohttp_server(app)
    receiver.url = str(server.make_url(path))
    return receiver


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    link = RedisLink.connect(redis_server.url)
    yield link
    await link.close()


@dataclass
class Replica:
    notifier: Notifier
    metrics: Metrics

    def count(self, outcome: str) -> int:
        return int(self.metrics.notifications.labels(outcome)._value.get())


@pytest.fixture
async def replicas() -> AsyncIterator[Callable[..., Any]]:
    """``await start(link, receiver, **endpoint settings)``: a started notifier on the Redis queue, closed after."""
    started: list[Replica] = []

    async def start(link: RedisLink, receiver: Receiver, **settings: Any) -> Replica:
        def queue(url: str, size: int, dropped: Callable[[int], None]) -> EventQueue:
            return RedisQueue(link, url, size, dropped, hold=HOLD, poll=POLL)

        endpoint = Endpoint(receiver.url, **{"backoff": 0.01, "attempts": 5, "timeout": 5.0, **settings})
        metrics = Metrics()
        replica = Replica(Notifier([endpoint], metrics, "replica:5000", "mirror-test", queues=queue), metrics)
        await replica.notifier.start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.notifier.close()


def event(tag: str) -> Event:
    info = RequestInfo("id", "127.0.0.1", "mirror:5000", "PUT", "test")
    digest = "sha256:" + hashlib.sha256(tag.encode()).hexdigest()
    return Event("push", "my/app", digest, OCI_MANIFEST, 1, tag, None, "http://mirror:5000/v2/my/app", info)


async def drain(*replicas: Replica) -> None:
    async with asyncio.timeout(WITHIN):
        for replica in replicas:
            await replica.notifier.drain()


def waiting(link: RedisLink, url: str) -> str:
    """The Redis list of the events waiting for ``url`` (storage.redisqueue's layout)."""
    return key("webhooks", hashlib.sha256(url.encode()).hexdigest()[:16])


async def test_two_replicas_send_each_event_once_in_order(
    link: RedisLink, receiver: Receiver, replicas: Callable[..., Any]
) -> None:
    receiver.delay = 0.02  # long enough for a second sender to overlap, were there one
    a, b = await replicas(link, receiver), await replicas(link, receiver)
    for i in range(5):
        a.notifier.publish(event(f"a{i}"))
        b.notifier.publish(event(f"b{i}"))
    await drain(a, b)
    tags = receiver.tags()
    assert sorted(tags) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)])  # each once
    assert [t for t in tags if t.startswith("a")] == [f"a{i}" for i in range(5)]
    assert [t for t in tags if t.startswith("b")] == [f"b{i}" for i in range(5)]
    assert a.count("sent") + b.count("sent") == 10
    assert receiver.attempts == 10
    assert receiver.most_at_once == 1  # one replica sends the endpoint's events at a time


async def test_the_events_of_a_replica_that_stops_are_sent_by_another(
    link: RedisLink, receiver: Receiver, replicas: Callable[..., Any]
) -> None:
    receiver.refuse_first = 10**6  # down while the first replica tries
    a = await replicas(link, receiver, attempts=1000)
    for i in range(3):
        a.notifier.publish(event(str(i)))
    await receiver.wait_for(lambda: receiver.attempts >= 2)  # retrying event 0; 1 and 2 wait in Redis
    a.notifier.publish(event("3"))
    await a.notifier.close()  # writes event 3 out before it lets the queue go
    receiver.refuse_first = receiver.attempts  # up again
    b = await replicas(link, receiver)
    await drain(b)
    assert receiver.tags() == ["0", "1", "2", "3"]
    assert b.count("sent") == 4 and a.count("sent") == 0


KILLED_REPLICA = """
import asyncio, hashlib, sys
from mirror.metrics import Metrics
from mirror.notify import Endpoint, Event, Notifier, RequestInfo
from mirror.storage.cluster import RedisLink
from mirror.storage.redisqueue import RedisQueue

async def main(url: str, redis_url: str, hold: float) -> None:
    link = RedisLink.connect(redis_url)
    queue = lambda u, size, dropped: RedisQueue(link, u, size, dropped, hold=hold, poll=0.05)
    notifier = Notifier([Endpoint(url, backoff=0.01, attempts=1000)], Metrics(), "a:5000", "test", queues=queue)
    await notifier.start()
    info = RequestInfo("id", "127.0.0.1", "a:5000", "PUT", "test")
    for tag in ("0", "1", "2"):
        digest = "sha256:" + hashlib.sha256(tag.encode()).hexdigest()
        notifier.publish(Event("push", "my/app", digest, "m", 1, tag, None, "u", info))
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


async def test_the_events_of_a_replica_that_is_killed_are_sent_by_another(
    link: RedisLink, redis_server: RedisServer, receiver: Receiver, replicas: Callable[..., Any]
) -> None:
    receiver.refuse_first = 10**6
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_REPLICA, receiver.url, redis_server.url, str(HOLD), env=env
    )
    try:
        await receiver.wait_for(lambda: receiver.attempts >= 2)  # it holds the queue, retrying event 0
    finally:
        proc.kill()  # no clean-up: its lock stays until it expires, event 0 stays in flight
        await proc.wait()
    receiver.refuse_first = receiver.attempts
    b = await replicas(link, receiver)
    b.notifier.publish(event("3"))
    await drain(b)
    assert receiver.tags() == ["0", "1", "2", "3"]  # event 0, in flight when it died, sent once: it never went through


async def test_a_receiver_down_for_a_while_gets_every_event_once(
    link: RedisLink, receiver: Receiver, replicas: Callable[..., Any]
) -> None:
    receiver.refuse_first = 6
    a, b = await replicas(link, receiver, attempts=20), await replicas(link, receiver, attempts=20)
    a.notifier.publish(event("a0"))
    b.notifier.publish(event("b0"))
    a.notifier.publish(event("a1"))
    await drain(a, b)
    tags = receiver.tags()
    assert sorted(tags) == ["a0", "a1", "b0"]
    assert tags.index("a0") < tags.index("a1")
    assert a.count("retried") + b.count("retried") == 6  # one retry per refusal, whichever replica sent
    assert a.count("sent") + b.count("sent") == 3
    assert a.count("failed") + b.count("failed") == 0


async def test_the_bound_drops_the_oldest_waiting_events_and_counts_them(
    monkeypatch: pytest.MonkeyPatch, link: RedisLink, receiver: Receiver, replicas: Callable[..., Any]
) -> None:
    monkeypatch.setattr("mirror.notify.QUEUE_SIZE", 2)
    receiver.hold = asyncio.Event()
    a, b = await replicas(link, receiver), await replicas(link, receiver)
    a.notifier.publish(event("0"))
    await receiver.wait_for(lambda: receiver.attempts == 1)  # event 0 in flight: it no longer counts in the bound
    a.notifier.publish(event("1"))
    a.notifier.publish(event("2"))
    async with asyncio.timeout(WITHIN):
        while await link.aio.llen(waiting(link, receiver.url)) < 2:  # noqa: ASYNC110 - Redis's state, not ours
            await asyncio.sleep(0.01)
    b.notifier.publish(event("3"))
    b.notifier.publish(event("4"))  # the list holds 1, 2, 3, 4: cut to the last two
    await eventually(lambda: b.count("dropped") == 2, WITHIN, "the cut counted")
    receiver.hold.set()
    await drain(a, b)
    assert receiver.tags() == ["0", "3", "4"]
    assert (a.count("dropped"), b.count("dropped")) == (0, 2)


class Logged(logging.Handler):
    """Sets ``seen`` when a record containing ``text`` is logged."""

    def __init__(self, text: str):
        super().__init__(logging.WARNING)
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.fixture
def logged() -> Iterator[Logged]:
    handler = Logged("cannot queue webhook events")
    logger = logging.getLogger("mirror.storage.redisqueue")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_a_redis_out_of_reach_never_fails_a_publish_and_its_events_go_once_it_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, receiver: Receiver, replicas: Callable[..., Any], logged: Logged
) -> None:
    monkeypatch.setattr("mirror.notify.QUEUE_SIZE", 3)
    later = RedisServer(tmp_path / "redis", port=free_port())  # nothing listens there yet
    link = RedisLink.connect(later.url, timeout=1.0)
    try:
        a = await replicas(link, receiver)
        for i in range(5):
            a.notifier.publish(event(str(i)))  # returns at once; the buffer keeps the last three
        assert a.count("dropped") == 2
        async with asyncio.timeout(WITHIN):
            await logged.seen.wait()  # the write failed, logged
        await asyncio.to_thread(later.start)
        await drain(a)
        assert receiver.tags() == ["2", "3", "4"]
        await a.notifier.close()
    finally:
        await link.close()
        later.stop()
