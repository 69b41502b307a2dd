"""The replicas' change counter (``storage.rediscounter``) against a real ``redis-server``: a bump through one
replica is seen by another within milliseconds (announced on pub/sub, not waited for by polling), and after Redis
restarts the follower finds bumps again without being restarted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink
from mirror.storage.rediscounter import RedisCounter
from tests.support.redis import redis_server


@contextlib.asynccontextmanager
async def following(counter: RedisCounter) -> AsyncIterator[None]:
    cycle = counter.lifecycle(None)
    await anext(cycle)
    try:
        yield
    finally:
        with contextlib.suppress(StopAsyncIteration):
            await anext(cycle)


async def seen(counter: RedisCounter, value: int, within: float) -> float:
    """Seconds until ``counter`` shows ``value``; fails past ``within``."""
    began = time.monotonic()
    while counter.value() != value:
        if time.monotonic() - began > within:
            raise AssertionError(f"value {value} not seen within {within} s (still {counter.value()})")
        await asyncio.sleep(0.005)
    return time.monotonic() - began


async def subscribed(link: RedisLink) -> None:
    for _ in range(500):
        if (await link.aio.pubsub_numsub("mirror:test-changes"))[0][1] == 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the follower never subscribed")


async def test_a_bump_is_seen_by_another_replica_at_once_and_again_after_redis_restarts(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis:
        one, two = RedisLink.connect(redis.url), RedisLink.connect(redis.url)
        bumper, follower = RedisCounter(one, "test-changes"), RedisCounter(two, "test-changes", poll=30.0)
        try:
            async with following(follower):
                await subscribed(one)
                first = await asyncio.to_thread(bumper.bump_sync)
                assert await seen(follower, first, within=2.0) < 0.5, "announced, not found by a poll 30 s away"

                redis.restart()  # empty again (no persistence), and the follower's subscription is gone
                assert follower.value() == first, "the last value read stays while Redis is away"
                again = await asyncio.to_thread(bumper.bump_sync)
                assert again != first, "a counter that starts again never repeats the value the replicas last read"
                await seen(follower, again, within=10.0)

                with pytest.raises(StoreUnavailable):  # a push that cannot tell the others answers 503
                    RedisCounter(RedisLink.connect("redis://127.0.0.1:1/0", timeout=0.5), "x").bump_sync()
        finally:
            await one.close()
            await two.close()
