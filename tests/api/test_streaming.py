"""Streaming a blob that is still being fetched: the moment between the temp file's rename into the store and the
fetch marking itself finished must not cut the client off (small blobs land exactly there)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from mirror.api.keys import PULL
from mirror.api.streaming import SENDER
from mirror.oci.reference import Digest
from mirror.pull.inflight import FetchState
from tests.conftest import MirrorFactory


async def test_client_joining_a_fetch_mid_rename_gets_the_whole_blob(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    client = await make_mirror("http://127.0.0.1:9")  # never reached: the fetch below is the only source
    pull = client.app[PULL]
    data = b"config bytes " * 12
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    renamed = asyncio.Event()

    async def fetch_that_is_renaming(fetch: FetchState) -> None:
        # The temp file is already gone (renamed), but finish() has not been called yet.
        fetch.begin(len(data), tmp_path / "renamed-away")
        await renamed.wait()
        final = pull._store.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(data)
        fetch.advance(len(data))
        fetch.finish(final)

    pull.inflight.join("docker.io", digest, fetch_that_is_renaming)
    get = asyncio.create_task(client.get(f"/v2/library/small/blobs/{digest}"))
    await asyncio.sleep(0.2)  # the handler has sent its headers and found no temp file
    renamed.set()
    resp = await asyncio.wait_for(get, 10)
    assert resp.status == 200
    assert await resp.read() == data


async def test_sendfile_threads_belong_to_the_app(make_mirror: MirrorFactory) -> None:
    """The worker threads that run sendfile are the app's, created with it and shut down with it (no module
    state): two apps never share them, and none outlives its app."""
    first = await make_mirror("http://127.0.0.1:9")
    second = await make_mirror("http://127.0.0.1:9")
    sender = first.app[SENDER]
    assert sender is not second.app[SENDER]
    assert not sender.closed
    await first.close()
    assert sender.closed
