"""A cold blob's clients get their last byte as soon as its digest is verified, not once the store has published
it: the fsync and rename (tens of ms here for a few MiB, a second for 512 MiB) and the index writes run while the
clients finish. The bytes are right whether or not the store then keeps them.

The store's faults (a slow fsync, an I/O error while publishing) cannot be made to happen on a real disk at will:
``BlobStore.publish_sync`` is wrapped. The upstream is the in-process fake registry, whose only role here is to
send the bytes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from mirror.api.keys import PULL, STORE
from mirror.oci.reference import Digest
from mirror.storage.blobs import BlobStore
from tests.conftest import MirrorClient, MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.support.plain_http import sha256

Fake = tuple[FakeRegistry, TestServer]


async def test_clients_get_the_last_byte_once_verified_not_once_published(
    fake_upstream: Fake, make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, server = fake_upstream
    data = os.urandom(3_000_000)
    digest = Digest.parse(fake.add_blob(data))
    release = threading.Event()
    publish = BlobStore.publish_sync

    def slow_publish(self: BlobStore, temp_path: Path, digest: Digest) -> None:
        release.wait(30)  # a slow fsync and rename: the clients must not wait for it
        publish(self, temp_path, digest)

    monkeypatch.setattr(BlobStore, "publish_sync", slow_publish)
    client = await make_mirror(str(server.make_url("")))
    path = f"/v2/test/blob/blobs/{digest}"
    store = client.app[STORE]
    try:
        # The client whose GET started the fetch: it streams it (one that asks once the bytes are verified waits
        # for the publish and is answered as a hit, as the conditional GET below).
        body = await asyncio.wait_for(_body(client, path), 20)
        assert sha256(body) == str(digest)
        assert store.size_sync(digest) is None, "the clients waited for the publish"
        late = asyncio.create_task(_conditional(client, path, str(digest)))
        await asyncio.sleep(0.1)
        assert not late.done(), "a client asking after the verification is answered once the blob is stored"
    finally:
        release.set()
    assert await asyncio.wait_for(late, 10) == 304  # answered as a hit: its If-None-Match honoured
    assert store.size_sync(digest) == len(data)
    assert await _body(client, path) == data
    assert fake.count("GET", "blobs") == 1


async def test_a_publish_failing_after_verification_completes_its_clients_and_stores_nothing(
    fake_upstream: Fake, make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, server = fake_upstream
    data = os.urandom(2_000_000)
    digest = Digest.parse(fake.add_blob(data))
    publish, failures = BlobStore.publish_sync, [OSError(errno.EIO, "Input/output error")]

    def failing_publish(self: BlobStore, temp_path: Path, digest: Digest) -> None:
        if failures:
            raise failures.pop()
        publish(self, temp_path, digest)

    monkeypatch.setattr(BlobStore, "publish_sync", failing_publish)
    client = await make_mirror(str(server.make_url("")))
    path = f"/v2/test/blob/blobs/{digest}"
    assert await _body(client, path) == data  # verified bytes: the client is not cut for the store's failure
    await _until(lambda: not client.app[PULL].inflight.under_way())  # the fetch has ended (failed)
    store = client.app[STORE]
    assert store.size_sync(digest) is None, "nothing is stored when publishing failed"
    assert not list((store.path(digest).parents[3] / "tmp").glob("*")), "the temp file is removed"
    assert await _body(client, path) == data  # fetched again, and kept this time
    assert fake.count("GET", "blobs") == 2
    await _until(lambda: store.size_sync(digest) == len(data))


async def _body(client: MirrorClient, path: str) -> bytes:
    resp = await client.get(path)
    assert resp.status == 200
    return await resp.read()


async def _conditional(client: MirrorClient, path: str, etag: str) -> int:
    resp = await client.get(path, headers={"If-None-Match": f'"{etag}"'})
    await resp.read()
    return resp.status


async def _until(check: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - the store's state, not an event of ours
            await asyncio.sleep(0.02)
