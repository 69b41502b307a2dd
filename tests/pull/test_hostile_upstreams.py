"""Hostile and broken upstreams: huge or endless bodies, no Content-Length, redirects back to the mirror, drips.

The mirror and the fake upstream run in this process; each test checks the client's answer (status and OCI
code), that nothing partial stays on disk, and where a large body is offered, that the mirror's memory stays
bounded (``tests.support.memory``: tracemalloc's peak, and the growth of the process's peak RSS).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from mirror.app import create_app
from mirror.config import Config, ConfigError, UpstreamConfig, build
from mirror.storage.blobs import BlobStore
from mirror.storage.writer import BlobWriter, DiskFull
from tests.conftest import MirrorClient, MirrorFactory
from tests.fakes.registry import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, FakeRegistry, sha256
from tests.support.memory import MiB, memory_peak

MEMORY_BOUND = 48 * MiB  # what the mirror may hold at once while hundreds of MiB pass (or are refused)


@pytest.fixture
def hostile(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_upstream: tuple[FakeRegistry, TestServer]
) -> MirrorFactory:
    """``await hostile(upstream={...}, **config)``: a mirror of the fake upstream with these settings."""
    _, server = fake_upstream

    async def make(upstream: dict[str, Any] | None = None, **top: Any) -> MirrorClient:
        settings = {"timeout": 5.0, **(upstream or {})}
        default = UpstreamConfig(registry="docker.io", url=str(server.make_url("")), default=True, **settings)
        config = Config(data_dir=tmp_path / "data", upstreams=(default,), **top)
        return await aiohttp_client(create_app(config))

    return make


def temp_files(tmp_path: Path) -> list[str]:
    tmp = tmp_path / "data" / "tmp"
    return os.listdir(tmp) if tmp.exists() else []


async def error_of(resp: aiohttp.ClientResponse) -> tuple[str, str]:
    assert resp.content_type == "application/json", await resp.text()
    entry = (await resp.json())["errors"][0]
    return entry["code"], entry["message"]


def padded_manifest(size: int) -> bytes:
    """An OCI image manifest of ``size`` bytes (an annotation pads it)."""
    config = {"mediaType": OCI_CONFIG, "digest": sha256(b"{}"), "size": 2}
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [], "annotations": {}}
    bare = len(json.dumps({**body, "annotations": {"pad": ""}}).encode())
    body["annotations"] = {"pad": "x" * (size - bare)}
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


# --- manifests: read to the end, up to the spec's 4 MiB ---------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "by_digest", "digest_header", "status"),
    [
        pytest.param(200_000, False, True, 200, id="200 KB manifest by tag -> 200, whole"),
        pytest.param(200_000, True, True, 200, id="200 KB manifest by digest -> 200, whole"),
        pytest.param(200_000, False, False, 200, id="200 KB manifest without Docker-Content-Digest -> whole"),
        pytest.param(3_900_000, False, True, 200, id="3.9 MB manifest by tag -> 200, whole"),
        pytest.param(3_900_000, True, False, 200, id="3.9 MB manifest by digest without digest header -> 200"),
        pytest.param(5_000_000, False, True, 502, id="5 MB manifest -> 502 naming the limit"),
        pytest.param(5_000_000, True, False, 502, id="5 MB manifest by digest, no digest header -> 502"),
    ],
)
async def test_large_manifests(
    fake_upstream: tuple[FakeRegistry, TestServer],
    hostile: MirrorFactory,
    size: int,
    by_digest: bool,
    digest_header: bool,
    status: int,
) -> None:
    fake, _ = fake_upstream
    data = padded_manifest(size)
    digest = fake.add_manifest("library/big", OCI_MANIFEST, data, ("1",))
    fake.faults.manifest_no_digest = not digest_header
    mirror = await hostile()
    resp = await mirror.get(f"/v2/big/manifests/{digest if by_digest else '1'}")
    assert resp.status == status
    if status == 200:
        assert resp.headers["Docker-Content-Digest"] == digest
        assert await resp.read() == data
        again = await mirror.get(f"/v2/big/manifests/{digest}")  # and what was cached is the whole manifest
        assert again.status == 200 and await again.read() == data
    else:
        code, message = await error_of(resp)
        assert code == "UNAVAILABLE"
        assert "limit of 4194304 bytes" in message


async def test_large_referrers_index_is_read_whole(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory
) -> None:
    fake, _ = fake_upstream
    subject = fake.add_image("library/app", "1", [b"layer"])
    entry = {"mediaType": OCI_MANIFEST, "digest": sha256(b"sig"), "size": 3, "artifactType": "application/x-sig"}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry] * 1500}  # ~200 KB
    fake.referrers[("library/app", subject)] = json.dumps(index).encode()
    assert len(fake.referrers[("library/app", subject)]) > 150_000
    mirror = await hostile()
    resp = await mirror.get(f"/v2/app/referrers/{subject}")
    assert resp.status == 200
    assert len((await resp.json())["manifests"]) == 1500


# --- unbounded bodies: tags/list, error bodies, token answers ------------------------------------------------------------------
async def test_endless_tags_list_is_cut_at_the_limit_in_bounded_memory(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory
) -> None:
    fake, _ = fake_upstream
    fake.faults.endless_tags = 200 * MiB
    mirror = await hostile()
    with memory_peak("endless tags/list (200 MiB offered)") as peak:
        resp = await mirror.get("/v2/library/alpine/tags/list")
        code, message = await error_of(resp)
    assert resp.status == 503 and code == "UNAVAILABLE"
    assert "tags/list answer larger than the limit" in message
    assert peak.traced < MEMORY_BOUND
    assert fake.offered < 32 * MiB, "the mirror kept reading past the limit"


async def test_500_with_a_huge_body_is_read_no_further_than_an_error_needs(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory
) -> None:
    fake, _ = fake_upstream
    fake.faults.error_body = 200 * MiB
    mirror = await hostile()
    with memory_peak("500 with a 200 MiB body") as peak:
        resp = await mirror.get("/v2/library/alpine/manifests/latest")
        code, message = await error_of(resp)
    assert resp.status == 503 and code == "UNAVAILABLE"
    assert "500" in message
    assert peak.traced < MEMORY_BOUND
    assert fake.offered < 32 * MiB


async def test_endless_token_answer_is_cut_at_the_limit(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory
) -> None:
    fake, _ = fake_upstream
    fake.faults.token_auth = True
    fake.faults.token_body = 200 * MiB
    mirror = await hostile()
    with memory_peak("token endpoint answer of 200 MiB") as peak:
        resp = await mirror.get("/v2/library/alpine/manifests/latest")
        code, _ = await error_of(resp)
    assert resp.status == 503 and code == "UNAVAILABLE"
    assert peak.traced < MEMORY_BOUND
    assert fake.offered < 32 * MiB


# --- blobs without (or with a huge) Content-Length --------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "status", "says"),
    [
        pytest.param({"cache_size": 32 * MiB}, 507, "larger than the whole cache", id="past --cache-size -> 507"),
        pytest.param({"max_blob_size": 8 * MiB}, 502, "max_blob_size", id="past max_blob_size -> 502"),
    ],
)
async def test_endless_blob_without_content_length_is_bounded(
    fake_upstream: tuple[FakeRegistry, TestServer],
    hostile: MirrorFactory,
    tmp_path: Path,
    settings: dict[str, Any],
    status: int,
    says: str,
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_blob(os.urandom(1000))
    fake.faults.endless_blobs = 200 * MiB
    mirror = await hostile(**settings)
    with memory_peak(f"endless blob without Content-Length, {settings}") as peak:
        resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
        code, message = await error_of(resp)
    assert resp.status == status and code == "UNAVAILABLE"
    assert says in message
    assert peak.traced < MEMORY_BOUND
    assert fake.offered < 64 * MiB, "the mirror kept reading past its bound"
    assert temp_files(tmp_path) == []


async def test_200_mib_chunked_body_streams_to_disk_in_bounded_memory(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory, tmp_path: Path
) -> None:
    """All of a 200 MiB body without Content-Length passes through the mirror; it does not match the digest, so
    the client gets a 502 at the end and the temp file goes."""
    fake, _ = fake_upstream
    digest = fake.add_blob(os.urandom(1000))
    fake.faults.endless_blobs = 200 * MiB
    mirror = await hostile()
    with memory_peak("200 MiB chunked blob, all of it read") as peak:
        resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
        code, message = await error_of(resp)
    assert resp.status == 502 and code == "UNAVAILABLE"
    assert "hashes to" in message or "expected" in message
    assert fake.offered == 200 * MiB
    assert peak.traced < MEMORY_BOUND
    assert temp_files(tmp_path) == []


async def test_content_length_past_max_blob_size_is_refused_before_reading(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory, tmp_path: Path
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_blob(os.urandom(2 * MiB))
    mirror = await hostile(max_blob_size=MiB)
    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
    code, message = await error_of(resp)
    assert resp.status == 502 and code == "UNAVAILABLE"
    assert f"of {2 * MiB} bytes is larger than the limit of {MiB} bytes (max_blob_size)" in message
    assert temp_files(tmp_path) == []


async def test_blob_without_content_length_larger_than_the_free_disk_is_507(
    fake_upstream: tuple[FakeRegistry, TestServer],
    hostile: MirrorFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_blob(os.urandom(8 * MiB))
    fake.faults.blob_no_length = True
    monkeypatch.setattr(BlobStore, "free_space_sync", lambda self: 4 * MiB, raising=False)
    mirror = await hostile()
    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
    code, message = await error_of(resp)
    assert resp.status == 507 and code == "UNAVAILABLE"
    assert "free" in message
    assert temp_files(tmp_path) == []


async def test_disk_filling_during_a_blob_without_content_length_is_507_not_a_plain_500(
    fake_upstream: tuple[FakeRegistry, TestServer],
    hostile: MirrorFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_blob(os.urandom(3 * MiB))
    fake.faults.blob_no_length = True

    def full(self: BlobWriter, data: Any) -> None:
        raise DiskFull("No space left on device")

    monkeypatch.setattr(BlobWriter, "_write_sync", full)
    mirror = await hostile()
    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
    code, message = await error_of(resp)
    assert resp.status == 507 and code == "UNAVAILABLE"
    assert "disk is full" in message
    assert temp_files(tmp_path) == []


async def test_blob_without_content_length_within_bounds_is_served(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory
) -> None:
    fake, _ = fake_upstream
    data = os.urandom(3 * MiB)
    digest = fake.add_blob(data)
    fake.faults.blob_no_length = True
    mirror = await hostile(max_blob_size=4 * MiB, cache_size=64 * MiB)
    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == data


# --- redirects back to the mirror -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        pytest.param("blobs/{blob}", id="blob redirected to the mirror itself -> 502 at once"),
        pytest.param("manifests/1", id="manifest by tag redirected to the mirror itself -> 502 at once"),
        pytest.param("manifests/{manifest}", id="manifest by digest redirected to the mirror itself -> 502"),
    ],
)
async def test_redirect_back_to_the_mirror_fails_fast(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory, path: str
) -> None:
    fake, _ = fake_upstream
    manifest = fake.add_image("library/loop", "1", [os.urandom(1000)])
    blob = next(d for d, b in fake.blobs.items() if len(b) == 1000)
    mirror = await hostile()
    fake.faults.redirect_to = str(mirror.make_url(""))
    started = time.monotonic()
    async with asyncio.timeout(10):
        resp = await mirror.get("/v2/loop/" + path.format(blob=blob, manifest=manifest))
        code, message = await error_of(resp)
    assert resp.status == 502 and code == "UNAVAILABLE"
    assert "this mirror itself" in message
    assert time.monotonic() - started < 3.0


# --- drips ------------------------------------------------------------------------------------------------------
async def test_dripping_blob_is_cut_at_the_minimum_rate(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory, tmp_path: Path
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_blob(os.urandom(64 << 10))
    fake.faults.drip = 16
    fake.faults.drip_pause = 0.05  # ~320 bytes/s: 200 s for the blob
    mirror = await hostile(upstream={"min_rate": 10_000, "rate_window": 0.5})
    started = time.monotonic()
    async with asyncio.timeout(10):
        resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
        assert resp.status == 200  # Content-Length known: the headers went out before the drip began
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
    assert len(received) < 64 << 10
    assert time.monotonic() - started < 5.0
    for _ in range(100):  # the fetch task removes its temp file right after the cut
        if not temp_files(tmp_path):
            break
        await asyncio.sleep(0.02)
    assert temp_files(tmp_path) == []


async def test_dripping_blob_without_content_length_gets_a_clear_error(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_blob(os.urandom(64 << 10))
    fake.faults.drip = 16
    fake.faults.drip_pause = 0.05
    fake.faults.blob_no_length = True
    mirror = await hostile(upstream={"min_rate": 10_000, "rate_window": 0.5})
    async with asyncio.timeout(10):
        resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
        code, message = await error_of(resp)
    assert resp.status == 503 and code == "UNAVAILABLE"
    assert "below the minimum of 10000 bytes/s" in message


async def test_slow_but_moving_blob_is_not_cut(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory
) -> None:
    """About 1 MB/s against a floor of 200 KB/s over half-second windows: the whole blob arrives."""
    fake, _ = fake_upstream
    data = os.urandom(3_000_000)
    digest = fake.add_blob(data)
    fake.faults.drip = 100_000
    fake.faults.drip_pause = 0.1
    mirror = await hostile(upstream={"min_rate": 200_000, "rate_window": 0.5})
    resp = await mirror.get(f"/v2/library/alpine/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data


async def test_dripping_manifest_gets_an_error_within_the_upstream_timeout(
    fake_upstream: tuple[FakeRegistry, TestServer], hostile: MirrorFactory
) -> None:
    fake, _ = fake_upstream
    fake.add_manifest("library/slow", OCI_MANIFEST, padded_manifest(20_000), ("1",))
    fake.faults.drip_manifests = True
    fake.faults.drip = 10
    fake.faults.drip_pause = 0.05  # 100 s for the manifest
    mirror = await hostile(upstream={"timeout": 1.0})
    started = time.monotonic()
    async with asyncio.timeout(10):
        resp = await mirror.get("/v2/slow/manifests/1")
        code, message = await error_of(resp)
    assert resp.status == 503 and code == "UNAVAILABLE"
    assert "timed out" in message
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(
    ("flat", "tables", "expected"),
    [
        pytest.param({}, None, (16 << 30, 4096.0, 30.0), id="defaults: 16GiB, 4096 bytes/s over 30 s"),
        pytest.param({"max_blob_size": "2GiB"}, None, (2 << 30, 4096.0, 30.0), id="max_blob_size in human units"),
        pytest.param(
            {},
            [{"registry": "docker.io", "url": "https://registry-1.docker.io", "min_rate": 1000, "rate_window": 5}],
            (16 << 30, 1000.0, 5.0),
            id="[[upstreams]] min_rate and rate_window",
        ),
    ],
)
def test_limits_config(flat: dict[str, Any], tables: list[Mapping[str, Any]] | None, expected: tuple[Any, ...]) -> None:
    config = build(flat, tables, {})
    upstream = config.default_upstream
    assert (config.max_blob_size, upstream.min_rate, upstream.rate_window) == expected


def test_max_blob_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_blob_size"):
        build({"max_blob_size": "0"}, None, {})
