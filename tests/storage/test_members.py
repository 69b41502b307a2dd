"""Cluster membership (``storage.members``) against a real ``redis-server``: replicas listed with their addresses
while they beat, gone at once when they leave, gone by themselves a TTL after their last beat, and registered
again by the heartbeat once Redis comes back empty."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink
from mirror.storage.members import MEMBERS, Heartbeat, Members
from tests.support.redis import RedisServer, redis_fixture, redis_server  # noqa: F401 - redis_fixture: the fixture


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    found = RedisLink.connect(redis_server.url)
    await found.aio.flushdb()
    yield found
    await found.close()


async def until(predicate: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    """Poll an async predicate (expiry in Redis is nothing a test can await)."""
    for _ in range(int(within / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not met within {within} s")


async def test_members_are_listed_with_their_addresses_oldest_first_and_leave_at_once(link: RedisLink) -> None:
    members = Members(link)
    await members.beat("b", "http://b:5000", 200.0, 3)
    await members.beat("a", "http://a:5000", 100.0, 0)
    await members.beat("b", "http://b:5000", 200.0, 1)  # a renewal: listed once, its latest state
    listed = await members.list()
    assert [(m.id, m.advertise, m.started_at, m.fetches) for m in listed] == [
        ("a", "http://a:5000", 100.0, 0),
        ("b", "http://b:5000", 200.0, 1),
    ]
    assert all(abs(m.last_seen - time.time()) < 2.0 for m in listed)
    await members.leave("a")
    assert [m.id for m in await members.list()] == ["b"]


async def test_a_member_that_stops_beating_drops_out_after_its_ttl(link: RedisLink) -> None:
    short = Members(link, ttl=2.0)  # long enough that a busy machine lists both before it expires
    await short.beat("dead", "http://dead:5000", 1.0, 0)
    await Members(link).beat("alive", "http://alive:5000", 2.0, 0)
    began = time.monotonic()
    assert [m.id for m in await short.list()] == ["dead", "alive"]

    async def dropped() -> bool:
        return [m.id for m in await short.list()] == ["alive"]

    await until(dropped, "the dead member dropped")
    assert time.monotonic() - began >= 1.6, "not before its TTL"
    assert await link.aio.zrange(MEMBERS, 0, -1) == [b"alive"], "and pruned from the ids listed"


async def test_the_heartbeat_registers_again_when_redis_comes_back_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server(tmp_path / "redis") as server:  # one of its own: this test stops it
        link = RedisLink.connect(server.url, timeout=1.0)
        members = Members(link)
        heartbeat = Heartbeat(members, "me", "http://me:5000", lambda: 2, interval=0.05)
        heartbeat.start()
        try:

            async def listed() -> bool:
                return [(m.id, m.fetches) for m in await members.list()] == [("me", 2)]

            await until(listed, "registered")
            server.stop()
            with pytest.raises(StoreUnavailable):
                await members.list()
            with caplog.at_level(logging.WARNING, "mirror.storage.members"):

                async def warned() -> bool:
                    return "not renewed" in caplog.text

                await until(warned, "the failing beat logged")
            server.start()  # empty: the next beat registers the replica again
            await until(listed, "registered again")
            assert caplog.text.count("not renewed") == 1, "logged once, not at every beat"
        finally:
            await heartbeat.close()
        assert await members.list() == [], "closed: it left"
        await link.close()


async def test_the_heartbeat_stops_even_when_the_client_swallows_the_cancellation(link: RedisLink) -> None:
    """redis-py's asyncio client can return from a command as if no cancellation had come during it: the heartbeat
    must still end when the replica shuts down, not beat forever and hang the shutdown."""
    inside, swallowed = asyncio.Event(), list[bool]()

    class Swallowing(Members):
        async def beat(self, *args: object, **kwargs: object) -> None:
            inside.set()
            if not swallowed:
                try:
                    await asyncio.sleep(0.2)
                except asyncio.CancelledError:  # what the client may do with a cancellation mid-call (once here)
                    swallowed.append(True)
            await super().beat(*args, **kwargs)  # type: ignore[arg-type]

    heartbeat = Heartbeat(Swallowing(link), "me", "http://me:5000", interval=0.01)
    heartbeat.start()
    await inside.wait()
    closing = asyncio.ensure_future(heartbeat.close())
    done, _ = await asyncio.wait({closing}, timeout=5)
    if not done and heartbeat._task is not None:  # stop it before failing: a second cancellation is not swallowed
        heartbeat._task.cancel()
        await closing
    assert swallowed and done, "the heartbeat still runs 5 s after its close"
    assert await Members(link).list() == [], "closed: it left"
