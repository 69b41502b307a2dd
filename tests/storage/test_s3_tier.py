"""The local tier of the object store (``storage.tier``, ``[storage] local_cache``) against a real SeaweedFS: a
fetched object leaves its verified copy on local disk, a read from the bucket fills one (never from a damaged
object), past the bound the least recently served copies go, and removing an object drops its copy."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mirror.oci.reference import Digest
from mirror.storage.s3 import Bucket, S3Store
from tests.support.ops import blob_files
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - the fixture

SIZE = 300_000
StoreFactory = Callable[[int], S3Store]


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@pytest.fixture
async def stores(seaweed: Seaweed, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Stores over one data dir and one prefix of their own in the module's bucket, with a tier of the bound
    given (several: a restart)."""
    prefix = f"tier-{secrets.token_hex(4)}/"
    bucket = Bucket(
        seaweed.bucket, seaweed.endpoint_url, seaweed.region, prefix, seaweed.access_key, seaweed.secret_key
    )
    made: list[S3Store] = []

    def make(bound: int) -> S3Store:
        made.append(S3Store(tmp_path / "data", bucket, bound))
        return made[-1]

    yield make
    for store in made:
        await store.close()


async def fetched(store: S3Store, data: bytes) -> Digest:
    """``data`` written as an upstream fetch is: the writer knows the digest."""
    digest = digest_of(data)
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", digest)
    await writer.write(data)
    await writer.commit(digest, len(data))
    return digest


async def filled(store: S3Store, digest: Digest, size: int) -> None:
    store.warm(digest, size)
    await asyncio.gather(*store._fills)  # noqa: SLF001 - the background fills, awaited instead of polled


def copies(store: S3Store) -> dict[str, int]:
    return blob_files(store.local.root.parent)


async def test_a_fetched_object_leaves_its_copy(stores: StoreFactory) -> None:
    store = stores(10 * SIZE)
    data = os.urandom(SIZE)
    digest = await fetched(store, data)

    copy = store.local_copy(digest)
    assert copy is not None and await asyncio.to_thread(copy.read_bytes) == data
    assert copies(store) == {str(digest): SIZE}
    assert list(store.tmp_dir.iterdir()) == [], "the temp file became the copy"
    assert await store.read(digest) == data, "and the object is in the bucket"


async def test_a_read_from_the_bucket_fills_a_copy_and_a_damaged_object_none(
    stores: StoreFactory, seaweed: Seaweed
) -> None:
    store = stores(10 * SIZE)
    good, damaged = os.urandom(SIZE), os.urandom(SIZE)
    raw = raw_client(seaweed.endpoint_url)
    raw.put_object(Bucket=seaweed.bucket, Key=store.key(digest_of(good)), Body=good)
    raw.put_object(
        Bucket=seaweed.bucket, Key=store.key(digest_of(damaged)), Body=damaged[:-1] + bytes([damaged[-1] ^ 1])
    )

    await filled(store, digest_of(good), SIZE)
    await filled(store, digest_of(damaged), SIZE)

    assert copies(store) == {str(digest_of(good)): SIZE}
    assert store.local_copy(digest_of(damaged)) is None
    assert list(store.tmp_dir.iterdir()) == []


async def test_past_the_bound_the_least_recently_served_copies_go(stores: StoreFactory) -> None:
    store = stores(3 * SIZE)
    first, second, third = [await fetched(store, os.urandom(SIZE)) for _ in range(3)]
    assert store.local_copy(first) is not None  # served: now more recent than the second

    fourth = await fetched(store, os.urandom(SIZE))
    assert set(copies(store)) == {str(first), str(third), str(fourth)}
    assert store.local_copy(second) is None
    assert store.tier is not None and store.tier.total == 3 * SIZE

    big = os.urandom(4 * SIZE)  # larger than the bound: no copy, nothing else dropped for it
    assert store.local_copy(await fetched(store, big)) is None
    assert set(copies(store)) == {str(first), str(third), str(fourth)}


async def test_removing_an_object_drops_its_copy_and_a_restart_finds_the_copies(stores: StoreFactory) -> None:
    store = stores(10 * SIZE)
    kept, deleted, evicted = [await fetched(store, os.urandom(SIZE)) for _ in range(3)]

    assert await store.delete(deleted)
    store.withdraw(evicted)
    assert store.local_copy(evicted) is None, "withdrawn: absent at once"
    assert await store.remove_withdrawn([evicted]) == [evicted]
    assert set(copies(store)) == {str(kept)}

    again = stores(10 * SIZE)
    await asyncio.to_thread(again.load_tier_sync)
    assert again.local_copy(kept) == store.local.path(kept)
    assert again.local_copy(deleted) is None
