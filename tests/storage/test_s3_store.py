"""The object storage backend (``storage.s3.S3Store``) against a real SeaweedFS: content becomes visible only once
verified, a failed or interrupted write leaves nothing behind, and reads, walks and verification see the bucket
as it is."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mirror.oci.reference import Digest
from mirror.storage.s3 import Bucket, S3Store
from mirror.storage.s3writer import PART_SIZE, S3Writer
from mirror.storage.writer import DigestMismatch, SizeMismatch
from tests.support.ops import record_figures
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - the fixture

MiB = 1 << 20


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@pytest.fixture
async def store(seaweed: Seaweed, tmp_path: Path) -> AsyncIterator[S3Store]:
    """A store under a prefix of its own in the module's bucket, so tests see only their own objects."""
    bucket = Bucket(
        seaweed.bucket, seaweed.endpoint_url, seaweed.region, f"t-{secrets.token_hex(4)}/", *seaweed_keys(seaweed)
    )
    store = S3Store(tmp_path / "data", bucket)
    yield store
    await store.close()


def seaweed_keys(seaweed: Seaweed) -> tuple[str, str]:
    return seaweed.access_key, seaweed.secret_key


def objects(store: S3Store) -> dict[str, int]:
    """Every object under the store's prefix, as the raw client lists it: key -> size."""
    client = raw_client(store.bucket.endpoint_url or "")
    listed = client.list_objects_v2(Bucket=store.bucket.name, Prefix=store.bucket.prefix)
    return {item["Key"]: item["Size"] for item in listed.get("Contents", [])}


def uploads(store: S3Store) -> list[str]:
    """The keys of multipart uploads under way (or left) under the store's prefix."""
    client = raw_client(store.bucket.endpoint_url or "")
    listed = client.list_multipart_uploads(Bucket=store.bucket.name, Prefix=store.bucket.prefix)
    return [upload["Key"] for upload in listed.get("Uploads", [])]


async def write_all(writer: S3Writer, data: bytes, step: int = MiB) -> None:
    for start in range(0, len(data), step):
        await writer.write(data[start : start + step])


async def test_commit_makes_the_object_visible_only_after_the_digest_matched(store: S3Store) -> None:
    data = os.urandom(2 * PART_SIZE + 123)
    digest = digest_of(data)
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", digest)
    await write_all(writer, data)
    assert uploads(store) == [store.key(digest)], "the parts stream into a multipart upload as they fill"
    assert objects(store) == {} and await store.size(digest) is None, "nothing visible before commit"
    assert writer.temp_path.stat().st_size == len(data), "the temp file followers tail holds every byte"

    assert await writer.commit(digest, len(data)) == digest
    assert objects(store) == {store.key(digest): len(data)}
    assert uploads(store) == []
    assert await store.size(digest) == len(data)
    assert await store.read(digest) == data
    assert not writer.temp_path.exists(), "the temp file goes once the object is complete"


async def test_a_small_blob_is_one_put_after_verification(store: S3Store) -> None:
    data = b'{"schemaVersion": 2}'
    digest = await store.put(data, digest_of(data))
    assert objects(store) == {store.key(digest): len(data)}
    assert await store.read_verified(digest) == data
    assert await asyncio.to_thread(store.read_sync, digest) == data
    assert await asyncio.to_thread(store.size_sync, digest) == len(data)


@pytest.mark.parametrize("size", [1000, 2 * PART_SIZE + 5], ids=["one part", "multipart"])
@pytest.mark.parametrize(
    ("wrong", "error"),
    [("digest", DigestMismatch), ("size", SizeMismatch)],
    ids=["wrong digest -> aborted, no object", "wrong size -> aborted, no object"],
)
async def test_a_wrong_digest_or_size_aborts_and_leaves_no_object(
    store: S3Store, size: int, wrong: str, error: type[Exception]
) -> None:
    data = os.urandom(size)
    claimed = digest_of(data + b"x") if wrong == "digest" else digest_of(data)
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", claimed)
    await write_all(writer, data)
    with pytest.raises(error):
        await writer.commit(claimed, size + 1 if wrong == "size" else size)
    assert objects(store) == {}
    assert uploads(store) == [], "the parts already uploaded are dropped"
    assert not writer.temp_path.exists()
    assert await store.size(claimed) is None and await store.size(digest_of(data)) is None


async def test_an_interrupted_writer_leaves_no_object(store: S3Store) -> None:
    """Cancelled mid-stream (a client or the upstream gone): the miss path aborts; and a writer that is never
    completed (the process killed) leaves at most an incomplete upload, which no reader sees."""
    data = os.urandom(3 * PART_SIZE)
    digest = digest_of(data)
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", digest)
    two_parts = asyncio.Event()

    async def fetch() -> None:
        try:
            for start in range(0, len(data), MiB):
                await writer.write(data[start : start + MiB])
                if writer.written > 2 * PART_SIZE:
                    two_parts.set()
                    await asyncio.Event().wait()  # the upstream stalls: the fetch is cut here
        except BaseException:
            await writer.abort()
            raise

    task = asyncio.create_task(fetch())
    await two_parts.wait()
    assert uploads(store) == [store.key(digest)]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert objects(store) == {} and uploads(store) == []
    assert not writer.temp_path.exists()

    crashed = await asyncio.to_thread(store.fetch_writer, "docker.io", digest)
    await write_all(crashed, data[: 2 * PART_SIZE + 1])  # then nothing: no commit, no abort
    assert objects(store) == {} and await store.size(digest) is None
    await crashed.abort()


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, None), (100, 200), (0, 1), (PART_SIZE - 10, PART_SIZE + 10), (2 * PART_SIZE, None), (5, 2 * PART_SIZE + 7)],
    ids=["whole", "100-199", "first byte", "across a part boundary", "last part", "to the last byte"],
)
async def test_ranged_reads_give_the_right_bytes(store: S3Store, start: int, end: int | None) -> None:
    data = os.urandom(2 * PART_SIZE + 7)
    digest = digest_of(data)
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", digest)
    await write_all(writer, data)
    await writer.commit(digest, len(data))
    got = b"".join([chunk async for chunk in store.stream(digest, start, end)])
    assert got == data[start:end]


async def test_reads_of_a_missing_blob(store: S3Store) -> None:
    missing = digest_of(b"never stored")
    assert await store.size(missing) is None
    assert await store.read(missing) is None
    assert await asyncio.to_thread(store.read_sync, missing) is None
    assert await store.delete(missing) is False
    assert await asyncio.to_thread(store.intact_sync, missing) is None
    with pytest.raises(FileNotFoundError):
        [chunk async for chunk in store.stream(missing)]
    with pytest.raises(FileNotFoundError):
        await asyncio.to_thread(store.open_growing, store.tmp_dir / "fetch-gone", missing)


async def test_walk_lists_what_was_committed(store: S3Store) -> None:
    blobs = [os.urandom(n) for n in (10, 1000, PART_SIZE + 1)]
    for data in blobs:
        await store.put(data, digest_of(data))
    stray = f"{store.bucket.prefix}blobs/sha256/not-a-digest"
    await asyncio.to_thread(raw_client(store.bucket.endpoint_url or "").put_object, Bucket=store.bucket.name, Key=stray)
    aborted = await asyncio.to_thread(store.fetch_writer, "docker.io", digest_of(b"aborted"))
    await aborted.write(b"aborted")
    await aborted.abort()

    found = await asyncio.to_thread(lambda: list(store.walk_sync()))
    assert sorted((f.key, f.size) for f in found if f.key) == sorted((str(digest_of(d)), len(d)) for d in blobs)
    assert [f.location for f in found if not f.key] == ["sha256/not-a-digest"]
    assert all(f.mtime > 0 for f in found)


async def test_intact_detects_a_corrupted_object(store: S3Store) -> None:
    good, bad = os.urandom(3 * MiB), os.urandom(3 * MiB)
    await store.put(good, digest_of(good))
    await store.put(bad, digest_of(bad))
    raw = raw_client(store.bucket.endpoint_url or "")
    damaged = bytes([bad[0] ^ 1]) + bad[1:]
    await asyncio.to_thread(raw.put_object, Bucket=store.bucket.name, Key=store.key(digest_of(bad)), Body=damaged)

    assert await asyncio.to_thread(store.intact_sync, digest_of(good)) is True
    assert await asyncio.to_thread(store.intact_sync, digest_of(bad)) is False
    assert await store.read_verified(digest_of(bad)) is None, "a damaged small blob is never served"
    location = f"sha256/{digest_of(bad).hex}"
    target = await asyncio.to_thread(store.quarantine_sync, location, str(digest_of(bad)))
    assert await store.size(digest_of(bad)) is None
    assert target.removeprefix(f"s3://{store.bucket.name}/") in objects(store)


async def test_delete_withdraw_and_a_publish_that_cancels_the_removal(store: S3Store) -> None:
    one, two = os.urandom(100), os.urandom(200)
    await store.put(one, digest_of(one))
    await store.put(two, digest_of(two))
    assert await store.delete(digest_of(one)) is True
    assert await store.size(digest_of(one)) is None

    store.withdraw(digest_of(two))
    assert await store.size(digest_of(two)) is None, "withdrawn: absent at once"
    await store.put(two, digest_of(two))  # fetched again before the removal ran
    assert await store.remove_withdrawn([digest_of(two)]) == []
    assert await store.read(digest_of(two)) == two
    store.withdraw(digest_of(two))
    assert await store.remove_withdrawn([digest_of(two)]) == [digest_of(two)]
    assert objects(store) == {}


async def test_a_follower_after_the_commit_reads_the_object(store: S3Store) -> None:
    """A client that opens the fetch's file after the temp file went gets the complete object instead."""
    data = os.urandom(PART_SIZE + 1)
    digest = digest_of(data)
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", digest)
    await write_all(writer, data)
    early = await asyncio.to_thread(store.open_growing, writer.temp_path, digest)
    await writer.commit(digest, len(data))
    late = await asyncio.to_thread(store.open_growing, writer.temp_path, digest)
    try:
        assert await asyncio.to_thread(early.read) == data
        assert await asyncio.to_thread(late.read) == data
    finally:
        early.close()
        late.close()


async def test_a_presigned_url_gets_the_blob_without_credentials(store: S3Store) -> None:
    data = os.urandom(5000)
    digest = await store.put(data, digest_of(data))
    url = await store.presigned_url(digest)
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == data
    async with aiohttp.ClientSession() as session, session.get(url.partition("?")[0]) as resp:
        assert resp.status == 403, "the signature is what grants the GET"


async def test_64_mib_are_written_in_bounded_memory(store: S3Store) -> None:
    chunk = os.urandom(MiB)
    total = 64
    hasher = hashlib.sha256()
    for _ in range(total):
        hasher.update(chunk)
    digest = Digest("sha256", hasher.hexdigest())
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", digest)
    await store.client()  # made before measuring: the client's models are loaded once per process
    tracemalloc.start()
    try:
        for _ in range(total):
            await writer.write(chunk)
        await writer.commit(digest, total * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    record_figures("s3_write_64mib", peak_bytes=peak)
    assert await store.size(digest) == total * MiB
    assert peak < 24 * MiB, f"peak {peak / MiB:.1f} MiB for a 64 MiB blob"
