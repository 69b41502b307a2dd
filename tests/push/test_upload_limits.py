"""Upload sessions are bounded: capped per client address and in all (429 TOOMANYREQUESTS past a cap, restarts
included), their bytes count against the cache's size (stats, eviction), and idle ones are removed first when the
cache is over its high watermark."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mirror.api.keys import LOCAL
from mirror.housekeeping import open_admin
from tests.conftest import MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.support.pushing import mirror_config

REPO = "my/app"


@pytest.mark.parametrize(
    ("per_client", "total", "allowed", "scope"),
    [
        pytest.param(3, 100, 3, "client", id="4th session from one client -> 429 TOOMANYREQUESTS (per client)"),
        pytest.param(100, 2, 2, "total", id="3rd session in all -> 429 TOOMANYREQUESTS (total)"),
    ],
)
async def test_sessions_past_a_cap_are_refused(
    push_mirror: MirrorFactory, per_client: int, total: int, allowed: int, scope: str
) -> None:
    client = await push_mirror(upload_max_sessions_per_client=per_client, upload_max_sessions=total)
    locations = []
    for _ in range(allowed):
        resp = await client.post(f"/v2/{REPO}/blobs/uploads/")
        assert resp.status == 202
        locations.append(resp.headers["Location"])
    resp = await client.post(f"/v2/{REPO}/blobs/uploads/")
    assert resp.status == 429
    error = (await resp.json())["errors"][0]
    assert (error["code"], error["detail"]) == ("TOOMANYREQUESTS", {"scope": scope, "limit": allowed})
    assert len(os.listdir(client.app[LOCAL].uploads.sessions.root)) == allowed  # nothing left behind

    assert (await client.delete(locations[0])).status == 204  # a cancelled session frees its place
    assert (await client.post(f"/v2/{REPO}/blobs/uploads/")).status == 202


async def test_sessions_from_before_a_restart_count(push_mirror: MirrorFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    client = await push_mirror(data_dir=data_dir, upload_max_sessions_per_client=2)
    for _ in range(2):
        assert (await client.post(f"/v2/{REPO}/blobs/uploads/")).status == 202
    await client.close()
    client = await push_mirror(data_dir=data_dir, upload_max_sessions_per_client=2)
    assert (await client.post(f"/v2/{REPO}/blobs/uploads/")).status == 429


async def test_session_bytes_count_in_the_cache_size(push_mirror: MirrorFactory, tmp_path: Path) -> None:
    """The server's stats, the metrics and ``mirror stats`` (a separate process reading the disk) see them."""
    data_dir = tmp_path / "data"
    client = await push_mirror(data_dir=data_dir, admin_api=True)
    location = (await client.post(f"/v2/{REPO}/blobs/uploads/")).headers["Location"]
    assert (await client.patch(location, data=b"x" * 3000)).status == 202
    stats = await (await client.get("/admin/v1/stats")).json()
    assert (stats["upload_sessions"], stats["upload_bytes"], stats["size_bytes"]) == (1, 3000, 3000)
    assert "mirror_cache_size_bytes 3000.0" in await (await client.get("/metrics")).text()

    async with open_admin(mirror_config(data_dir, "http://127.0.0.1:9")) as admin:
        offline = await admin.stats()
    assert (offline["upload_sessions"], offline["upload_bytes"], offline["size_bytes"]) == (1, 3000, 3000)

    await client.put(f"{location}?digest=sha256:{'0' * 64}")  # a wrong digest ends the session
    stats = await (await client.get("/admin/v1/stats")).json()
    assert (stats["upload_sessions"], stats["upload_bytes"]) == (0, 0)


async def test_over_the_watermark_idle_sessions_go_first(
    push_mirror: MirrorFactory, fake_upstream: tuple[FakeRegistry, object], tmp_path: Path
) -> None:
    """Cap 10,000 bytes: a cached 4,000-byte blob, an idle 3,000-byte session (10 minutes old), a fresh 5,000-byte
    one. Eviction drops the idle session and then the cached blob; the fresh session stays."""
    fake, _ = fake_upstream
    client = await push_mirror(admin_api=True, cache_size=10_000)
    digest = fake.add_blob(b"c" * 4000)
    resp = await client.get(f"/v2/library/alpine/blobs/{digest}")
    assert resp.status == 200 and len(await resp.read()) == 4000  # read whole: the blob is no longer leased
    idle = (await client.post(f"/v2/{REPO}/blobs/uploads/")).headers["Location"]
    assert (await client.patch(idle, data=b"i" * 3000)).status == 202
    long_ago = time.time() - 600
    os.utime(tmp_path / "data" / "uploads" / idle.rsplit("/", 1)[1] / "session.json", (long_ago, long_ago))
    fresh = (await client.post(f"/v2/{REPO}/blobs/uploads/")).headers["Location"]
    assert (await client.patch(fresh, data=b"f" * 5000)).status == 202  # 12,000 bytes: over the high watermark

    await client.post("/admin/v1/evict")  # waits for any eviction the growth started, or runs one
    assert (await client.get(idle)).status == 404
    assert (await client.get(fresh)).status == 204
    stats = await (await client.get("/admin/v1/stats")).json()
    assert (stats["upload_bytes"], stats["entries"]["blob"]) == (5000, 0)
    assert stats["size_bytes"] <= stats["low_watermark_bytes"]
