"""``BlobStore.open_growing``: how the HTTP layer opens a blob that is still arriving, without knowing the store's
files: the growing temp file, or the published blob once the writer renamed it, or FileNotFoundError."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from mirror.oci.reference import Digest
from mirror.storage.blobs import BlobStore


def digest_of(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


async def test_growing_file_is_read_while_written_then_after_publish(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"layer bytes " * 1000
    writer = store.writer()
    await writer.write(data[:100])
    growing = await asyncio.to_thread(store.open_growing, writer.temp_path, digest_of(data))
    try:
        assert growing.read() == data[:100]
        await writer.write(data[100:])
        assert growing.read() == data[100:]  # the same file, grown
    finally:
        growing.close()
    await writer.commit(digest_of(data), len(data))
    published = await asyncio.to_thread(store.open_growing, writer.temp_path, digest_of(data))
    with published:
        assert published.read() == data  # renamed meanwhile: the published blob


async def test_neither_temp_nor_published_raises(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(FileNotFoundError):
        await asyncio.to_thread(store.open_growing, store.tmp_dir / "gone", digest_of(b"never stored"))
