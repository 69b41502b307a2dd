"""Eviction to the byte cap, in process: least recently served first, pins and pushed content stay, an evicted
blob comes back transparently, and the disk never holds more than the cap plus one blob in flight.

The upstream is the fake registry because these tests count upstream GETs exactly; the same behaviour with real
pulls from a Distribution registry is in ``tests/integration/test_eviction.py``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from mirror.api.admin import ADMIN
from mirror.api.keys import USAGE
from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from mirror.oci.reference import Digest
from mirror.storage.entry import Entry
from mirror.storage.eviction import plan
from tests.conftest import MirrorClient, fetches_done
from tests.fakes.registry import FakeRegistry, sha256
from tests.support.ops import DiskWatch, eventually

LAYER = 100_000
LIMIT = 1_000_000
Mirror = tuple[MirrorClient, FakeRegistry, TestServer]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def images(fake: FakeRegistry, count: int) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        layer = os.urandom(LAYER)
        digest = fake.add_image(f"library/app{i}", "latest", [layer])
        out.append({"repo": f"library/app{i}", "manifest": digest, "layer": sha256(layer), "data": layer})
    return out


async def pull(client: MirrorClient, image: dict[str, Any]) -> None:
    resp = await client.get(f"/v2/{image['repo']}/manifests/latest", headers={"Accept": MANIFEST})
    assert resp.status == 200, await resp.text()
    resp = await client.get(f"/v2/{image['repo']}/blobs/{image['layer']}")
    assert resp.status == 200
    assert await resp.read() == image["data"]
    await fetches_done(client)


@pytest.fixture
async def mirror(aiohttp_client: AiohttpClient, tmp_path: Path) -> AsyncIterator[Mirror]:
    fake = FakeRegistry()
    server = TestServer(fake.app())
    await server.start_server()
    config = Config(
        data_dir=tmp_path / "data",
        upstreams=(UpstreamConfig(registry="docker.io", url=str(server.make_url("")), default=True, timeout=5.0),),
        cache_size=LIMIT,
        extra={"cache": {"high_watermark": 0.9, "low_watermark": 0.75, "flush_interval": 0.05}},
    )
    client = await aiohttp_client(create_app(config))
    yield client, fake, server
    await server.close()


def settled(client: MirrorClient) -> bool:
    usage = client.app[USAGE]
    return usage.pending == 0 and usage.used() <= client.app[ADMIN].housekeeper.limits.high


async def test_least_recently_served_go_first_pins_and_pushes_stay(mirror: Mirror, tmp_path: Path) -> None:
    client, fake, _ = mirror
    usage = client.app[USAGE]
    admin = client.app[ADMIN]
    imgs = images(fake, 10)
    with DiskWatch(tmp_path / "data") as watch:
        for image in imgs[:6]:
            await pull(client, image)
        assert admin.housekeeper.evictions == 0
        for image in imgs[:2]:  # served again: now the most recent
            await pull(client, image)
        await admin.pin("app2")  # pinned: stays although old
        await usage.mark_local([Digest.parse(imgs[3]["layer"])])  # pushed: stays although old
        for image in imgs[6:9]:
            await pull(client, image)
            await eventually(lambda: settled(client))
    cached = {key for key in usage.table}
    layers = [image["layer"] in cached for image in imgs[:9]]
    # 0, 1 were served again; 2 is pinned; 3's layer is pushed; 4, 5 were the least recently served; 6-8 are new.
    assert layers == [True, True, True, True, False, False, True, True, True]
    assert imgs[2]["manifest"] in cached and imgs[4]["manifest"] not in cached
    assert admin.housekeeper.evictions >= 1
    assert usage.total <= LIMIT
    assert watch.peak <= LIMIT + LAYER, f"disk peaked at {watch.peak} bytes"
    on_disk = sum(f.stat().st_size for f in (tmp_path / "data" / "blobs").rglob("*") if f.is_file())
    assert on_disk == usage.total  # the table matches the disk
    metrics = await (await client.get("/metrics")).text()
    assert 'mirror_cache_evictions_total{kind="blob"}' in metrics
    assert "mirror_cache_limit_bytes 1e+06" in metrics

    # An evicted blob is fetched again transparently.
    gets = fake.count("GET", "blobs")
    await pull(client, imgs[4])
    assert fake.count("GET", "blobs") == gets + 1


async def test_a_blob_being_read_is_not_evicted(mirror: Mirror) -> None:
    client, fake, _ = mirror
    usage = client.app[USAGE]
    housekeeper = client.app[ADMIN].housekeeper
    imgs = images(fake, 3)
    for image in imgs:
        await pull(client, image)
    oldest = Digest.parse(imgs[0]["layer"])
    with usage.lease(oldest):
        report = await housekeeper.evict(target=0)
    removed = {r.digest for r in report.removed}
    assert str(oldest) not in removed and imgs[1]["layer"] in removed
    assert str(oldest) in usage.table


async def test_touches_are_batched_and_flushed(mirror: Mirror) -> None:
    client, fake, _ = mirror
    usage = client.app[USAGE]
    (image,) = images(fake, 1)
    await pull(client, image)
    before = usage.entries_sync()[image["layer"]].last_served
    await pull(client, image)  # a hit: memory at once...
    assert usage.table[image["layer"]].last_served > before
    # ...and the disk at the next flush (flush_interval is 50 ms here).
    await eventually(lambda: usage.entries_sync()[image["layer"]].last_served > before)


def test_plan_orders_by_last_served_and_skips_protected() -> None:
    entries = [
        ("sha256:" + "a" * 64, Entry(10, 3.0)),
        ("sha256:" + "b" * 64, Entry(10, 1.0)),
        ("sha256:" + "c" * 64, Entry(10, 2.0, local=True)),
        ("sha256:" + "d" * 64, Entry(10, 0.5)),
        ("sha256:" + "e" * 64, Entry(10, 4.0)),
    ]
    chosen = plan(entries, used=50, target=25, protected={"sha256:" + "d" * 64})
    assert [r.digest[7] for r in chosen] == ["b", "a", "e"]
    assert plan(entries, used=20, target=25, protected=set()) == []


async def test_without_a_cache_size_nothing_is_evicted(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    fake = FakeRegistry()
    server = TestServer(fake.app())
    await server.start_server()
    try:
        config = Config(
            data_dir=tmp_path / "data",
            upstreams=(UpstreamConfig(registry="docker.io", url=str(server.make_url("")), default=True),),
        )
        client = await aiohttp_client(create_app(config))
        for image in images(fake, 3):
            await pull(client, image)
        admin = client.app[ADMIN]
        assert (await admin.evict(dry_run=True))["removed"] == []
        assert (await admin.evict(dry_run=False))["removed"] == []
        assert len(client.app[USAGE].table) == 6
    finally:
        await server.close()
