"""The replicas' ref locks (``storage.redislocks``) against a real ``redis-server``: one holder at a time, a waiter
that gets the lock as soon as it is let go (or runs without it past its wait), and a Redis that cannot be reached
costs the lock, never the request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from mirror.storage.cluster import RedisLink
from mirror.storage.redislocks import RedisRefLocks
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture


@pytest.fixture
async def links(redis_server: RedisServer) -> AsyncIterator[tuple[RedisLink, RedisLink]]:
    one, two = RedisLink.connect(redis_server.url), RedisLink.connect(redis_server.url)
    yield one, two
    await one.close()
    await two.close()


async def test_one_holder_at_a_time_and_a_waiter_gets_it_once_let_go(links: tuple[RedisLink, RedisLink]) -> None:
    first, second = RedisRefLocks(links[0]), RedisRefLocks(links[1])
    let_go = asyncio.Event()

    async def holder() -> None:
        async with first.hold("tag docker.io library/x latest", 10) as held:
            assert held
            await let_go.wait()

    task = asyncio.create_task(holder())
    await asyncio.sleep(0.05)
    began = time.monotonic()
    async with second.hold("tag docker.io library/x latest", 0.3) as held:
        # redis-py stops trying at its own reading of the clock: within a few ms of the 0.3 s asked
        assert not held and time.monotonic() - began >= 0.25, "held elsewhere: the block runs without it"
    async with second.hold("tag docker.io library/y latest", 0.3) as held:
        assert held, "another ref: free"
    waiter = asyncio.create_task(_take(second, "tag docker.io library/x latest"))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    let_go.set()
    assert await asyncio.wait_for(waiter, 2)
    await task


async def _take(locks: RedisRefLocks, ref: str) -> bool:
    async with locks.hold(ref, 5) as held:
        return held


async def test_without_redis_the_block_runs_without_the_lock() -> None:
    link = RedisLink.connect("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        async with RedisRefLocks(link).hold("tag docker.io library/x latest", 5) as held:
            assert not held
    finally:
        await link.close()
