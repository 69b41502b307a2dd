"""A HEAD of a blob that another process sharing the data dir is fetching (``FileLocks.announced``): answered from
the size that process announced, without asking the upstream; a dead fetcher's announcement is not believed. The
other process is a real child holding the fetch's lock (``tests.support.lockholder``), the upstream a real
Distribution registry whose access log counts the HEADs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from mirror.oci.reference import Digest
from mirror.storage.blobs import BlobStore
from tests.support.lockholder import hold, killed
from tests.support.ops import start_registry, upstream_requests
from tests.support.plain_http import push_blob

SIZE = 200_000


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("head")
    registry, url = start_registry(work / "registry", access_log=True)
    try:
        yield {"url": url, "log": work / "registry" / "registry.log"}
    finally:
        registry.stop()


ANNOUNCED = {
    "another process fetches it, size announced -> its size, the upstream not asked": (f"{SIZE} 12345\n", True, 0),
    "another process holds the key, nothing announced yet -> the upstream's HEAD": ("", True, 1),
    "the fetching process died -> its announcement not believed: the upstream's HEAD": (f"{SIZE} 12345\n", False, 1),
}


@pytest.mark.parametrize(("announcement", "alive", "heads"), list(ANNOUNCED.values()), ids=list(ANNOUNCED))
async def test_a_head_during_another_process_s_fetch(
    upstream: dict[str, Any], aiohttp_client: AiohttpClient, tmp_path: Path, announcement: str, alive: bool, heads: int
) -> None:
    digest = push_blob(upstream["url"], "library/headed", os.urandom(SIZE))
    config = Config(
        data_dir=tmp_path / "data",
        coordination="files",
        upstreams=(UpstreamConfig(registry="docker.io", url=upstream["url"], default=True),),
    )
    client = await aiohttp_client(create_app(config))
    store = BlobStore(tmp_path / "data")
    holder = await hold(store.tmp_dir / f"lock-{store.fetch_key('docker.io', Digest.parse(digest))}", announcement)
    try:
        if not alive:
            await killed(holder)
        async with client.head(f"/v2/library/headed/blobs/{digest}") as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == str(SIZE)
            assert resp.headers["Docker-Content-Digest"] == digest
    finally:
        await killed(holder)
    assert upstream_requests(upstream["log"], "HEAD", f"/blobs/{digest}") == heads
