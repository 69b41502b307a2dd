"""The fetch leases in a real Redis (``storage.leases``): taken once (SET NX), answering who holds them in the same
round trip, renewed and released only by their holder (compare-and-delete), expiring when nobody renews them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mirror.oci.reference import Digest
from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink
from mirror.storage.leases import STORED, Holder, Leases, lease_key, size_key
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture

DIGEST = Digest.parse("sha256:" + "ab" * 32)
A = Holder("fetch-a", "http://10.0.0.1:5000")
B = Holder("fetch-b", "http://10.0.0.2:5000")


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    link = RedisLink.connect(redis_server.url)
    await link.aio.flushdb()
    yield link
    await link.close()


async def test_the_first_take_wins_and_the_others_learn_the_holder(link: RedisLink) -> None:
    leases = Leases(link)
    results = await asyncio.gather(*(leases.take("docker.io", DIGEST, h) for h in (A, B, A, B)))
    assert results[0] is None, "the first SET NX takes it"
    assert results[1:] == [A, A, A], "every later take answers the holder, in the same round trip"
    assert await leases.holder("docker.io", DIGEST) == A
    assert await leases.take("ghcr.io", DIGEST, B) is None, "a lease is per (upstream, digest)"
    ttl = await link.aio.pttl(lease_key("docker.io", DIGEST))
    assert 0 < ttl <= leases.ttl * 1000


async def test_renewal_extends_only_the_holders_lease(link: RedisLink) -> None:
    leases = Leases(link, ttl=0.5)
    assert await leases.take("docker.io", DIGEST, A) is None
    await link.aio.pexpire(lease_key("docker.io", DIGEST), 100)
    assert await leases.renew("docker.io", DIGEST, A)
    assert await link.aio.pttl(lease_key("docker.io", DIGEST)) > 100, "renewed to the whole TTL"
    assert not await leases.renew("docker.io", DIGEST, B), "another holder's renewal changes nothing"
    assert await leases.holder("docker.io", DIGEST) == A


async def test_an_unrenewed_lease_expires_and_can_be_taken(link: RedisLink) -> None:
    leases = Leases(link, ttl=0.05)
    assert await leases.take("docker.io", DIGEST, A) is None
    assert await leases.take("docker.io", DIGEST, B) == A, "held until it expires"
    # Redis expires the key on its own clock and tells nobody: wait out what is left of its TTL.
    await asyncio.sleep(await link.aio.pttl(lease_key("docker.io", DIGEST)) / 1000 + 0.01)
    assert await leases.take("docker.io", DIGEST, B) is None
    assert await leases.holder("docker.io", DIGEST) == B


async def test_a_holder_whose_lease_was_taken_never_deletes_the_new_one(link: RedisLink) -> None:
    leases = Leases(link)
    assert await leases.take("docker.io", DIGEST, A) is None
    await link.aio.delete(lease_key("docker.io", DIGEST))  # A's lease expired (A stalled) ...
    assert await leases.take("docker.io", DIGEST, B) is None  # ... and B took it
    assert not await leases.renew("docker.io", DIGEST, A), "A learns it lost the lease"
    assert not await leases.release("docker.io", DIGEST, A), "A's release leaves B's lease alone"
    assert await leases.holder("docker.io", DIGEST) == B
    assert await leases.release("docker.io", DIGEST, B)
    assert await leases.holder("docker.io", DIGEST) is None
    assert await leases.take("docker.io", DIGEST, A) is None, "released: the next miss takes it"


async def test_the_holders_announced_size_lives_and_goes_with_its_lease(link: RedisLink) -> None:
    leases = Leases(link, ttl=0.5)
    assert await leases.take("docker.io", DIGEST, A) is None
    assert await leases.announced("docker.io", DIGEST) is None, "the upstream has not answered yet"
    assert not await leases.announce("docker.io", DIGEST, B, 1234), "only the holder announces"
    assert await leases.announce("docker.io", DIGEST, A, 1234)
    assert await leases.announced("docker.io", DIGEST) == 1234
    assert await leases.announced("ghcr.io", DIGEST) is None
    await link.aio.pexpire(size_key("docker.io", DIGEST), 100)
    assert await leases.renew("docker.io", DIGEST, A)
    assert await link.aio.pttl(size_key("docker.io", DIGEST)) > 100, "renewed with the lease"
    assert await leases.release("docker.io", DIGEST, A)
    assert await leases.announced("docker.io", DIGEST) is None
    assert await link.aio.exists(size_key("docker.io", DIGEST)) == 0, "released with the lease"


async def test_redis_unreachable_is_store_unavailable() -> None:
    link = RedisLink.connect("redis://127.0.0.1:9/0", timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable):
            await Leases(link).take("docker.io", DIGEST, A)
    finally:
        await link.close()


async def test_a_holder_that_stored_the_object_leaves_a_stored_mark_for_a_while(link: RedisLink) -> None:
    leases = Leases(link)
    assert await leases.take("docker.io", DIGEST, A) is None
    assert await leases.announce("docker.io", DIGEST, A, 1234)
    assert not await leases.finish("docker.io", DIGEST, B, 0.3), "only the holder's fetch marks it"
    assert await leases.finish("docker.io", DIGEST, A, 0.3)
    assert await leases.take("docker.io", DIGEST, B) == STORED, "a replica that misses learns it was stored"
    assert await leases.announced("docker.io", DIGEST) is None, "the size went with the lease"
    await asyncio.sleep(0.4)
    assert await leases.take("docker.io", DIGEST, B) is None, "the mark expires"
    assert await leases.finish("docker.io", DIGEST, B, 60)
    assert await leases.forget_stored("docker.io", DIGEST), "the object went: the mark too"
    assert await leases.take("docker.io", DIGEST, A) is None
