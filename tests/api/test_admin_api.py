"""``/readyz`` and the JSON admin API (off unless enabled), in process against the fake upstream."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from tests.conftest import MirrorClient, MirrorFactory
from tests.fakes.registry import FakeRegistry, sha256

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Upstream = tuple[FakeRegistry, TestServer]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    fake = FakeRegistry()
    server = TestServer(fake.app())
    await server.start_server()
    yield fake, server
    await server.close()


@pytest.fixture
def start(aiohttp_client: AiohttpClient, tmp_path: Path, upstream: Upstream) -> MirrorFactory:
    async def start(admin_api: bool = True) -> MirrorClient:
        config = Config(
            data_dir=tmp_path / "data",
            upstreams=(UpstreamConfig(registry="docker.io", url=str(upstream[1].make_url("")), default=True),),
            admin_api=admin_api,
            cache_size=10_000_000,
        )
        return await aiohttp_client(create_app(config))

    return start


async def test_readyz_says_why_the_mirror_is_not_ready(start: MirrorFactory, tmp_path: Path) -> None:
    client = await start(admin_api=False)
    resp = await client.get("/readyz")
    assert (resp.status, await resp.text()) == (200, "ready\n")
    tmp = tmp_path / "data" / "tmp"
    shutil.rmtree(tmp)
    tmp.write_bytes(b"not a directory any more")  # root ignores permission bits; this fails for anyone
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert "not writable" in await resp.text()
    finally:
        tmp.unlink()
        tmp.mkdir()
    assert (await client.get("/healthz")).status == 200


async def test_concurrent_readiness_probes_all_pass(start: MirrorFactory) -> None:
    """Load balancers and kubelets probe at once: each probe writes its own file, so none sees another's vanish."""
    client = await start(admin_api=False)
    for _ in range(5):
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(16)))
        assert [r.status for r in answers] == [200] * 16


async def test_admin_api_is_off_unless_enabled(start: MirrorFactory) -> None:
    client = await start(admin_api=False)
    resp = await client.get("/admin/v1/stats")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "NOT_FOUND"


async def test_admin_api_stats_ls_pins_evict_gc_prefetch(start: MirrorFactory, upstream: Upstream) -> None:
    fake, _ = upstream
    layers = [os.urandom(3000), os.urandom(5000)]
    digest = fake.add_image("library/web", "1.0", layers)
    client = await start()

    resp = await client.post("/admin/v1/prefetch", json={"images": ["web:1.0"]})
    assert resp.status == 200, await resp.text()
    (result,) = (await resp.json())["images"]
    assert result["image"] == "docker.io/library/web:1.0" and result["blobs"] == 3
    assert result["fetched_bytes"] == result["bytes"] > 8000
    gets = fake.count("GET", "blobs")
    for layer in layers:  # prefetched: hits, no upstream request
        assert await (await client.get(f"/v2/library/web/blobs/{sha256(layer)}")).read() == layer
    assert fake.count("GET", "blobs") == gets

    stats = await (await client.get("/admin/v1/stats")).json()
    assert stats["limit_bytes"] == 10_000_000 and stats["entries"] == {"blob": 3, "manifest": 1}
    assert stats["hit_ratio"]["blob"] == 0.4  # 3 misses (prefetch), 2 hits
    assert stats["top_repositories"][0]["repo"] == "docker.io/library/web"
    assert stats["bytes_served"]["cache"] == 8000

    (repo,) = (await (await client.get("/admin/v1/ls")).json())["repositories"]
    assert repo["repo"] == "docker.io/library/web"
    (tag,) = repo["tags"]
    assert (tag["tag"], tag["digest"], tag["blobs"]) == ("1.0", digest, 4)
    assert tag["size_bytes"] == stats["size_bytes"]

    assert (await (await client.put("/admin/v1/pins?image=web:1.0")).json())["changed"] is True
    assert (await (await client.get("/admin/v1/pins")).json())["pins"] == ["docker.io/library/web:1.0"]
    plan = await (await client.get("/admin/v1/evict")).json()
    assert plan["dry_run"] is True and plan["removed"] == []
    evicted = await (await client.post("/admin/v1/evict")).json()
    assert evicted["removed_count"] == 0  # under the low watermark, and pinned anyway
    assert (await (await client.delete("/admin/v1/pins?image=docker.io/library/web:1.0")).json())["changed"] is True

    gc = await (await client.post("/admin/v1/gc?dry_run=true")).json()
    assert gc["dry_run"] is True and gc["removed"] == []  # everything is referenced by the manifest


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("PUT", "/admin/v1/pins", None, 400, "NAME_INVALID"),
        ("PUT", "/admin/v1/pins?image=UPPER/case", None, 400, "NAME_INVALID"),
        ("POST", "/admin/v1/prefetch", b"not json", 400, "UNKNOWN"),
        ("POST", "/admin/v1/prefetch", b'{"images": []}', 400, "UNKNOWN"),
        ("POST", "/admin/v1/prefetch", b'{"images": ["nothere:1"]}', 404, "MANIFEST_UNKNOWN"),
    ],
    ids=[
        "PUT pins without image -> 400 NAME_INVALID",
        "PUT pins with a bad name -> 400 NAME_INVALID",
        "POST prefetch with a body that is not JSON -> 400",
        "POST prefetch with no images -> 400",
        "POST prefetch of an unknown image -> 404 MANIFEST_UNKNOWN",
    ],
)
async def test_admin_api_bad_input(
    start: MirrorFactory, method: str, path: str, body: bytes | None, status: int, code: str
) -> None:
    client = await start()
    resp = await client.request(method, path, data=body)
    assert resp.status == status
    assert (await resp.json())["errors"][0]["code"] == code
