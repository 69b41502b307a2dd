"""The replicas' internal endpoint (``api.peer``) streams a held fetch to a follower as to a client: every byte but
the last while the digest is unchecked, the last one as soon as it is verified, without waiting for the object to
be complete in the store (the follower verifies the bytes itself, so its clients need not wait for the holder's
upload).

In process: the endpoint of a real aiohttp app over a real temp file of the disk store; the fetch is driven by
hand, as the holder's miss path drives it."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror.api.keys import METRICS, STORE
from mirror.api.peer import PEERING, Peering, fetch_for_peer
from mirror.api.streaming import SENDER, Sender
from mirror.metrics import Metrics
from mirror.oci.reference import Digest
from mirror.pull.inflight import Fetch, FetchState
from mirror.storage.blobs import BlobStore
from mirror.upstream.peers import SECRET_HEADER

SECRET = "s" * 32


class Held:
    def __init__(self, fetch: Fetch):
        self.fetch = fetch

    def serving(self, registry: str, digest: Digest, fetch_id: str) -> FetchState | None:
        return self.fetch if fetch_id == "f1" else None


async def test_the_last_byte_goes_to_the_follower_once_verified_before_the_object_is_stored(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    store = BlobStore(tmp_path)
    temp = store.tmp_dir / "fetch"
    temp.write_bytes(data)  # every byte has arrived from the upstream
    fetch = Fetch(digest)
    fetch.begin(len(data), temp)
    fetch.advance(len(data))
    app = web.Application()
    app[PEERING], app[STORE], app[METRICS] = Peering(SECRET, Held(fetch)), store, Metrics()
    app[SENDER] = sender = Sender()
    app.cleanup_ctx.append(sender.lifecycle)
    app.router.add_get("/_mirror/v1/fetches/{registry}/{digest}", fetch_for_peer)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get(f"/_mirror/v1/fetches/docker.io/{digest}?fetch=f1", headers={SECRET_HEADER: SECRET})
        assert resp.status == 200
        got = await resp.content.readexactly(len(data) - 1)
        reading = asyncio.ensure_future(resp.content.read())
        await asyncio.sleep(0.3)
        assert not reading.done(), "the last byte waits for the digest check"
        fetch.verify()  # the holder's digest check passed; its upload to the bucket is still under way
        got += await asyncio.wait_for(reading, 5)
        assert got == data and fetch.final_path is None
