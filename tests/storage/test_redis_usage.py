"""The replicas' usage table and eviction lock in a real ``redis-server`` (``storage.redisusage``,
``storage.redislocks.RedisEvictionLock``): what one replica records, pins or counts, every other one reads exactly;
a Redis that cannot be reached costs no touch; a Redis that lost its data gets the table back from the replicas;
one replica evicts at a time, and a dead holder's lock expires.

The sharing and eviction behaviour common with processes on one data dir is tested in ``test_shared_usage.py``,
over both tables.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.oci.reference import Digest
from mirror.storage.base import StoreUnavailable
from mirror.storage.blobs import BlobStore
from mirror.storage.cluster import RedisLink
from mirror.storage.eviction import Limits
from mirror.storage.evictlock import EvictionBusy
from mirror.storage.housekeeper import Housekeeper
from mirror.storage.index import Index
from mirror.storage.redislocks import RedisEvictionLock
from mirror.storage.redisusage import RedisUsage
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture

A = Digest.parse("sha256:" + "a" * 64)
B = Digest.parse("sha256:" + "b" * 64)


@pytest.fixture
async def links(redis_server: RedisServer) -> AsyncIterator[tuple[RedisLink, RedisLink]]:
    one, two = RedisLink.connect(redis_server.url, timeout=1.0), RedisLink.connect(redis_server.url, timeout=1.0)
    yield one, two
    if redis_server.proc is None:
        redis_server.start()
    await one.aio.flushdb()
    await one.close()
    await two.close()


async def test_an_entry_reads_back_exactly_and_keeps_its_pushed_mark_and_repository(
    links: tuple[RedisLink, RedisLink],
) -> None:
    mine, other = RedisUsage(links[0]), RedisUsage(links[1])
    pushed = await asyncio.to_thread(mine.added_sync, A, 1234, "blob", "local/team/app", True)
    again = await asyncio.to_thread(other.added_sync, A, 1234, "blob")  # the same digest, pulled by another replica
    assert again.local and again.repo == "local/team/app" and again.last_served > pushed.last_served
    table, _ = await asyncio.to_thread(mine.load_sync)
    assert table == {str(A): again}, "every field, the last-served time to the microsecond"
    await asyncio.to_thread(other.mark_local_sync, [str(A)], False)
    assert not (await asyncio.to_thread(mine.load_sync))[0][str(A)].local


async def test_pins_and_repository_counts_are_the_clusters(links: tuple[RedisLink, RedisLink]) -> None:
    mine, other = RedisUsage(links[0]), RedisUsage(links[1])
    assert await asyncio.to_thread(mine.pin_sync, "docker.io/library/alpine:3.19")
    assert not await asyncio.to_thread(other.pin_sync, "docker.io/library/alpine:3.19"), "pinned already"
    assert set(await asyncio.to_thread(other.pins_sync)) == {"docker.io/library/alpine:3.19"}
    assert await asyncio.to_thread(other.unpin_sync, "docker.io/library/alpine:3.19")
    assert await asyncio.to_thread(mine.pins_sync) == {}
    await asyncio.to_thread(mine.add_repo_counts_sync, {("docker.io/library/a", "blob_hit"): 2})
    await asyncio.to_thread(other.add_repo_counts_sync, {("docker.io/library/a", "blob_hit"): 3})
    assert await asyncio.to_thread(mine.repo_counts_sync) == {"docker.io/library/a": {"blob_hit": 5}}


async def stored_blob(usage: RedisUsage, tmp_path: Path) -> tuple[Housekeeper, Digest]:
    """A replica's housekeeper (started) over ``usage``, and a blob it stored and recorded."""
    store = BlobStore(tmp_path)
    housekeeper = Housekeeper(store, Index(tmp_path), usage, Limits(flush_interval=3600))
    await housekeeper.start()
    digest = await store.put(b"x" * 10)
    await usage.added(digest, 10, "blob")
    return housekeeper, digest


async def test_touches_made_while_redis_is_down_are_written_once_it_is_back(
    links: tuple[RedisLink, RedisLink], redis_server: RedisServer, tmp_path: Path
) -> None:
    usage, reader = RedisUsage(links[0]), RedisUsage(links[1])
    housekeeper, digest = await stored_blob(usage, tmp_path)
    redis_server.stop()
    try:
        usage.touch(digest)  # a hit (from this replica's local tier): memory only, as always
        served = usage.table[str(digest)].last_served
        with pytest.raises(StoreUnavailable):
            await housekeeper.flush()
    finally:
        redis_server.start()  # empty: it lost the table too
    await housekeeper.flush()  # a new epoch: the entry is written back, with the touch
    table, _ = await asyncio.to_thread(reader.load_sync)
    assert table[str(digest)].last_served == served
    await housekeeper.close()


async def test_touches_a_flush_could_not_write_are_written_by_the_next(
    links: tuple[RedisLink, RedisLink], tmp_path: Path
) -> None:
    usage, reader = RedisUsage(links[0]), RedisUsage(links[1])
    housekeeper, digest = await stored_blob(usage, tmp_path)
    usage.touch(digest)
    served = usage.table[str(digest)].last_served
    await links[1].aio.client_pause(3000, all=False)  # writes wait: past the 1 s timeout, twice
    with pytest.raises(StoreUnavailable):
        await housekeeper.flush()
    await asyncio.sleep(1.2)  # the pause is over
    await housekeeper.flush()
    assert (await asyncio.to_thread(reader.load_sync))[0][str(digest)].last_served == served
    await housekeeper.close()


async def test_a_redis_that_lost_its_data_gets_the_table_back_from_the_replicas(
    links: tuple[RedisLink, RedisLink], redis_server: RedisServer, tmp_path: Path
) -> None:
    made, store = [], BlobStore(tmp_path)
    for link in links:
        usage = RedisUsage(link)
        housekeeper = Housekeeper(store, Index(tmp_path), usage, Limits(flush_interval=3600))
        await housekeeper.start()
        made.append((usage, housekeeper))
    (one, one_keeper), (two, two_keeper) = made
    a, b = await store.put(b"a" * 10), await store.put(b"b" * 20)
    await one.added(a, 10, "blob")
    await two.added(b, 20, "blob")
    for _, keeper in made:
        await keeper.flush()
    assert one.total == two.total == 30
    redis_server.restart()  # no persistence: everything in it is gone
    await one_keeper.flush()
    await two_keeper.flush()
    await one_keeper.flush()
    assert set(one.table) == set(two.table) == {str(a), str(b)} and one.total == two.total == 30
    assert set((await asyncio.to_thread(RedisUsage(links[0]).load_sync))[0]) == {str(a), str(b)}
    for _, keeper in made:
        await keeper.close()


def test_one_replica_evicts_at_a_time_and_a_dead_holders_lock_expires(links: tuple[RedisLink, RedisLink]) -> None:
    holder, other = RedisEvictionLock(links[0], ttl=0.6), RedisEvictionLock(links[1], ttl=0.6)
    assert holder.try_acquire_sync()
    time.sleep(1.0)  # past the TTL: renewed while held
    assert not other.try_acquire_sync()
    began = time.monotonic()
    with pytest.raises(EvictionBusy):
        other.acquire_sync(0.3)
    assert time.monotonic() - began >= 0.25
    waiter = threading.Thread(target=other.acquire_sync, args=(5.0,))
    waiter.start()
    time.sleep(0.1)
    holder.release_sync()
    waiter.join(5)
    assert not waiter.is_alive() and other._lock is not None, "taken as soon as it was let go"
    # A holder that dies renews nothing: its lock goes within the TTL.
    assert other._renewing is not None
    other._renewing.set()  # its renewing stops, as at a SIGKILL; the lock is not released
    other._lock = other._renewing = None
    began = time.monotonic()
    holder.acquire_sync(5.0)
    assert time.monotonic() - began < 1.0
    holder.release_sync()


def test_without_redis_no_replica_evicts() -> None:
    link = RedisLink.connect("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        assert not RedisEvictionLock(link).try_acquire_sync()
    finally:
        asyncio.run(link.close())
