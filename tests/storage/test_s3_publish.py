"""``S3Store.publish_file`` against a real SeaweedFS: a push upload's verified file on local disk becomes the object
of its digest, read back into the bucket and hashed again as it is read; bytes that no longer match (the file
changed after it was verified) leave no object and no multipart upload behind."""

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
from mirror.storage.writer import BlobWriter, DigestMismatch
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - the fixture

SIZES = pytest.mark.parametrize(
    "size", [200_000, 2 * PART_SIZE + 12_345], ids=["one PUT for a one-part blob", "a multipart upload of 3 parts"]
)


@pytest.fixture
async def store(seaweed: Seaweed, tmp_path: Path) -> AsyncIterator[S3Store]:
    """A store under a prefix of its own in the module's bucket, so tests see only their own objects."""
    prefix = f"p-{secrets.token_hex(4)}/"
    bucket = Bucket(
        seaweed.bucket, seaweed.endpoint_url, seaweed.region, prefix, seaweed.access_key, seaweed.secret_key
    )
    store = S3Store(tmp_path / "data", bucket)
    yield store
    await store.close()


def objects(store: S3Store) -> dict[str, int]:
    client = raw_client(store.bucket.endpoint_url or "")
    listed = client.list_objects_v2(Bucket=store.bucket.name, Prefix=store.bucket.prefix)
    return {item["Key"]: item["Size"] for item in listed.get("Contents", [])}


def uploads(store: S3Store) -> list[str]:
    client = raw_client(store.bucket.endpoint_url or "")
    listed = client.list_multipart_uploads(Bucket=store.bucket.name, Prefix=store.bucket.prefix)
    return [upload["Key"] for upload in listed.get("Uploads", [])]


def session_writer(store: S3Store, directory: Path) -> BlobWriter:
    """A push upload's writer: ``BlobWriter`` over a session's data file, outside ``tmp/`` (blocking)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").touch()
    return BlobWriter(store, "sha256", temp_path=directory / "data")


async def written(store: S3Store, data: bytes, directory: Path) -> BlobWriter:
    writer = await asyncio.to_thread(session_writer, store, directory)
    await writer.write(data)
    return writer


@SIZES
async def test_a_verified_upload_becomes_the_object(store: S3Store, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    writer = await written(store, data, tmp_path / "session")

    assert await writer.commit(digest) == digest

    assert objects(store) == {store.key(digest): size}
    assert await store.read(digest) == data
    assert not writer.temp_path.exists(), "the session's file is consumed"
    assert uploads(store) == []


@SIZES
async def test_bytes_changed_after_verification_leave_no_object(store: S3Store, tmp_path: Path, size: int) -> None:
    """The file is hashed again as its parts are read back: a byte flipped on disk after it was verified is caught
    before the request that would make the object visible."""
    data = os.urandom(size)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    path = tmp_path / "verified"
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

    with pytest.raises(DigestMismatch):
        await store.publish_file(path, digest)

    assert objects(store) == {}
    assert uploads(store) == [], "the parts read back were aborted"
    assert not path.exists()
