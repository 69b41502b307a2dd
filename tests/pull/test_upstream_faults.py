"""What a client gets when the upstream misbehaves in ways a real registry cannot be made to show.

Each test drives the mirror over HTTP (aiohttp test server) with the in-process fake upstream, and checks both
the client's answer and that nothing corrupt or partial is left in the cache.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import MirrorClient, MirrorFactory
from tests.fakes.registry import FakeRegistry, sha256


def cached_blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file()] if (data_dir / "blobs").exists() else []


def temp_files(data_dir: Path) -> list[str]:
    return os.listdir(data_dir / "tmp") if (data_dir / "tmp").exists() else []


async def error_code(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json()
    return str(body["errors"][0]["code"])


async def test_bearer_token_handshake_then_token_reused(mirror_and_fake: tuple[MirrorClient, FakeRegistry]) -> None:
    mirror, fake = mirror_and_fake
    fake.faults.token_auth = True
    digest = fake.add_image("library/alpine", "3.19", [os.urandom(1000)])

    resp = await mirror.get("/v2/alpine/manifests/3.19")
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    layer = next(d for d in fake.blobs if fake.blobs[d] != b"" and len(fake.blobs[d]) == 1000)
    resp = await mirror.get(f"/v2/alpine/blobs/{layer}")
    assert resp.status == 200 and await resp.read() == fake.blobs[layer]
    # One token for the repository's pull scope, cached and reused for the blob.
    assert fake.tokens_issued == 1


async def test_basic_auth_upstream_without_credentials_is_denied(
    fake_upstream: tuple[FakeRegistry, TestServer], make_mirror: MirrorFactory
) -> None:
    fake, server = fake_upstream
    fake.faults.basic_auth = ("ci", "s3cret")
    fake.add_image("team/app", "1", [b"layer"])
    mirror = await make_mirror(str(server.make_url("")))
    resp = await mirror.get("/v2/team/app/manifests/1")
    assert resp.status == 403
    assert await error_code(resp) == "DENIED"


async def test_basic_auth_with_credentials(
    fake_upstream: tuple[FakeRegistry, TestServer], make_mirror: MirrorFactory
) -> None:
    fake, server = fake_upstream
    fake.faults.basic_auth = ("ci", "s3cret")
    digest = fake.add_image("team/app", "1", [b"layer"])
    mirror = await make_mirror(str(server.make_url("")), username="ci", password="s3cret")
    resp = await mirror.get("/v2/team/app/manifests/1")
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest


async def test_429_without_cache_passes_retry_after(mirror_and_fake: tuple[MirrorClient, FakeRegistry]) -> None:
    mirror, fake = mirror_and_fake
    fake.add_image("library/nginx", "latest", [b"x"])
    fake.faults.rate_limited = "42"
    resp = await mirror.get("/v2/nginx/manifests/latest")
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "42"
    assert await error_code(resp) == "TOOMANYREQUESTS"


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"down": True}, id="upstream 503 -> last known digest, marked stale"),
        pytest.param({"rate_limited": "60"}, id="upstream 429 -> last known digest, marked stale"),
    ],
)
async def test_stale_if_error_serves_last_known_tag(
    fake_upstream: tuple[FakeRegistry, TestServer], make_mirror: MirrorFactory, fault: dict[str, object]
) -> None:
    fake, server = fake_upstream
    digest = fake.add_image("library/redis", "7", [b"redis layer"])
    mirror = await make_mirror(str(server.make_url("")), tag_ttl=0.0)
    fresh = await mirror.get("/v2/redis/manifests/7")
    assert fresh.status == 200 and "X-Mirror-Stale" not in fresh.headers

    for key, value in fault.items():
        setattr(fake.faults, key, value)
    stale = await mirror.get("/v2/redis/manifests/7")
    assert stale.status == 200
    assert stale.headers["Docker-Content-Digest"] == digest
    assert stale.headers["X-Mirror-Stale"] == "true"
    assert "110" in stale.headers["Warning"]
    assert await stale.read() == fake.manifests[("library/redis", digest)][1]
    metrics = await (await mirror.get("/metrics")).text()
    assert "mirror_stale_served_total{" in metrics


async def test_unknown_tag_with_upstream_down_is_503(mirror_and_fake: tuple[MirrorClient, FakeRegistry]) -> None:
    mirror, fake = mirror_and_fake
    fake.faults.down = True
    resp = await mirror.get("/v2/redis/manifests/never-seen")
    assert resp.status == 503
    assert await error_code(resp) == "UNAVAILABLE"


async def test_slow_upstream_gets_stale_answer_within_timeout(
    fake_upstream: tuple[FakeRegistry, TestServer], make_mirror: MirrorFactory
) -> None:
    fake, server = fake_upstream
    digest = fake.add_image("library/busybox", "1", [b"bb"])
    mirror = await make_mirror(str(server.make_url("")), tag_ttl=0.0, timeout=0.5)
    assert (await mirror.get("/v2/busybox/manifests/1")).status == 200

    fake.faults.delay = 30.0
    started = time.monotonic()
    resp = await mirror.get("/v2/busybox/manifests/1")
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["X-Mirror-Stale"] == "true"
    assert elapsed < 5.0, f"client waited {elapsed:.1f}s for a slow upstream"


async def read_until_cut(resp: aiohttp.ClientResponse) -> bytes:
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    return received


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("cut", id="upstream cuts the connection mid-blob -> client cut off, nothing cached"),
        pytest.param("corrupt", id="upstream sends wrong bytes -> client cut off, nothing cached"),
    ],
)
async def test_broken_blob_never_served_whole_nor_cached(
    fake_upstream: tuple[FakeRegistry, TestServer], make_mirror: MirrorFactory, tmp_path: Path, fault: str
) -> None:
    fake, server = fake_upstream
    data = os.urandom(3 << 20)
    digest = fake.add_blob(data)
    if fault == "cut":
        fake.faults.cut_blob_after = 1 << 20
    else:
        fake.faults.corrupt_blobs = True
    mirror = await make_mirror(str(server.make_url("")))

    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
    # Headers may already say 200 (the body streams as it arrives), but the body must come up short.
    if resp.status == 200:
        received = await read_until_cut(resp)
        assert len(received) < len(data)
    else:
        assert resp.status in (502, 503)
    data_dir = tmp_path / "data"
    for _ in range(100):  # the fetch task cleans up right after the failure
        if not temp_files(data_dir):
            break
        await asyncio.sleep(0.02)
    assert cached_blob_files(data_dir) == []
    assert temp_files(data_dir) == []

    # With the upstream healthy again, the same blob is fetched afresh and served whole.
    fake.faults.cut_blob_after = None
    fake.faults.corrupt_blobs = False
    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
    assert resp.status == 200
    assert sha256(await resp.read()) == digest


async def test_blob_redirect_followed_without_authorization(mirror_and_fake: tuple[MirrorClient, FakeRegistry]) -> None:
    mirror, fake = mirror_and_fake
    fake.faults.token_auth = True
    fake.faults.redirect_blobs = True
    data = os.urandom(50_000)
    digest = fake.add_blob(data)
    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data
    assert fake.storage_auth_headers == [None], "the upstream's token leaked to the redirect target"


async def test_concurrent_cold_gets_make_one_upstream_fetch(mirror_and_fake: tuple[MirrorClient, FakeRegistry]) -> None:
    mirror, fake = mirror_and_fake
    data = os.urandom(4 << 20)
    digest = fake.add_blob(data)
    fake.faults.drip = 256 << 10  # a slow upstream, so that all 16 clients arrive while it streams
    fake.faults.drip_pause = 0.01

    async def pull() -> bytes:
        resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
        assert resp.status == 200
        return await resp.read()

    bodies = await asyncio.gather(*(pull() for _ in range(16)))
    assert all(body == data for body in bodies)
    assert fake.count("GET", "blobs") == 1
    metrics = await (await mirror.get("/metrics")).text()
    assert "mirror_coalesced_waiters_total" in metrics


async def test_range_resume_during_a_miss(mirror_and_fake: tuple[MirrorClient, FakeRegistry]) -> None:
    """A client resuming with ``Range: bytes=N-`` while the blob is still arriving gets a 206 of the rest."""
    mirror, fake = mirror_and_fake
    data = os.urandom(2 << 20)
    digest = fake.add_blob(data)
    fake.faults.drip = 128 << 10
    fake.faults.drip_pause = 0.01
    first = asyncio.ensure_future(mirror.get(f"/v2/library/alpine/blobs/{digest}"))
    await fake.blob_started.wait()
    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}", headers={"Range": "bytes=1000-"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert await resp.read() == data[1000:]
    assert await (await first).read() == data
    assert fake.count("GET", "blobs") == 1
