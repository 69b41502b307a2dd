"""A fetch taken over into the bucket (``S3Store.fetch_writer(..., resume=True)``): the temp file a follower
streamed from a replica that died is continued, re-hashed from its first byte, and becomes one verified object;
a resumed file whose bytes are wrong never does."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.oci.reference import Digest
from mirror.storage.s3 import Bucket, S3Store
from mirror.storage.s3writer import PART_SIZE
from mirror.storage.writer import DigestMismatch
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - the fixture


@pytest.fixture
async def store(seaweed: Seaweed, tmp_path: Path) -> AsyncIterator[S3Store]:
    bucket = Bucket(
        seaweed.bucket, seaweed.endpoint_url, seaweed.region, f"r-{secrets.token_hex(4)}/", seaweed.access_key,
        seaweed.secret_key,
    )  # fmt: skip
    store = S3Store(tmp_path / "data", bucket)
    yield store
    await store.close()


def objects(store: S3Store) -> dict[str, int]:
    listed = raw_client(store.bucket.endpoint_url or "").list_objects_v2(
        Bucket=store.bucket.name, Prefix=store.bucket.prefix
    )
    return {item["Key"]: item["Size"] for item in listed.get("Contents", [])}


async def followed(store: S3Store, digest: Digest, data: bytes) -> None:
    """What a follower leaves for the takeover: ``data`` in the fetch's temp file (the local disk writer), kept."""
    local = await asyncio.to_thread(store.local.fetch_writer, "docker.io", digest)
    await local.write(data)
    await asyncio.to_thread(local.detach_sync)


@pytest.mark.parametrize("streamed", [1000, PART_SIZE + 5], ids=["within the first part", "past the first part"])
async def test_a_taken_over_fetch_continues_the_file_into_one_verified_object(store: S3Store, streamed: int) -> None:
    data = os.urandom(PART_SIZE + 300_000)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    await followed(store, digest, data[:streamed])
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", digest, True)
    assert writer.written == streamed and writer.temp_path == store.local.fetch_temp_path("docker.io", digest)
    await writer.write(data[streamed:])
    await writer.commit(digest, len(data))
    assert objects(store) == {store.key(digest): len(data)}
    assert await store.read_verified(digest) == data
    assert not writer.temp_path.exists()


async def test_a_resumed_file_with_wrong_bytes_is_never_published(store: S3Store) -> None:
    data = os.urandom(300_000)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    await followed(store, digest, os.urandom(1000))  # not the blob's first bytes
    writer = await asyncio.to_thread(store.fetch_writer, "docker.io", digest, True)
    await writer.write(data[1000:])
    with pytest.raises(DigestMismatch):
        await writer.commit(digest, len(data))
    assert objects(store) == {}
    assert not writer.temp_path.exists()
