"""Malformed requests get registry errors with the right status and OCI code, never a 500, and never reach the
upstream or a path outside the data directory."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import diskcache
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import MirrorClient, MirrorFactory
from tests.fakes.registry import FakeRegistry

HEX = "b" * 64


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        pytest.param(
            "GET", "/v2/Alpine/manifests/latest", {}, 400, "NAME_INVALID", id="upper-case name -> 400 NAME_INVALID"
        ),
        pytest.param("GET", "/v2/a..b/manifests/latest", {}, 400, "NAME_INVALID", id="double dot -> 400 NAME_INVALID"),
        pytest.param(
            "GET",
            "/v2/%2e%2e/%2e%2e/etc/manifests/x",
            {},
            404,
            "NOT_FOUND",
            id="encoded traversal normalised away -> 404 NOT_FOUND",
        ),
        pytest.param(
            "GET", "/v2/alpine/manifests/-bad", {}, 404, "MANIFEST_UNKNOWN", id="bad tag -> 404 MANIFEST_UNKNOWN"
        ),
        pytest.param(
            "GET",
            "/v2/alpine/manifests/.INVALID_MANIFEST_NAME",
            {},
            404,
            "MANIFEST_UNKNOWN",
            id="conformance's invalid tag -> 404 MANIFEST_UNKNOWN",
        ),
        pytest.param(
            "HEAD", "/v2/alpine/manifests/.INVALID_MANIFEST_NAME", {}, 404, None, id="HEAD invalid tag -> 404"
        ),
        pytest.param(
            "GET",
            "/v2/alpine/manifests/sha256:xyz",
            {},
            400,
            "DIGEST_INVALID",
            id="bad manifest digest -> 400 DIGEST_INVALID",
        ),
        pytest.param(
            "GET",
            "/v2/alpine/blobs/sha256:abc",
            {},
            400,
            "DIGEST_INVALID",
            id="short blob digest -> 400 DIGEST_INVALID",
        ),
        pytest.param(
            "GET",
            f"/v2/alpine/blobs/md5:{HEX}",
            {},
            400,
            "DIGEST_INVALID",
            id="unknown algorithm -> 400 DIGEST_INVALID",
        ),
        pytest.param("HEAD", "/v2/alpine/blobs/sha256:..%2f..%2fx", {}, 400, None, id="HEAD traversal digest -> 400"),
        pytest.param(
            "GET", "/v2/alpine/tags/list?n=abc", {}, 400, "PAGINATION_NUMBER_INVALID", id="non-numeric n -> 400"
        ),
        pytest.param("GET", "/v2/alpine/tags/list?n=-1", {}, 400, "PAGINATION_NUMBER_INVALID", id="negative n -> 400"),
        pytest.param(
            "GET",
            "/v2/alpine/tags/list?n=²",
            {},
            400,
            "PAGINATION_NUMBER_INVALID",
            id="tags n=² (a digit int() refuses) -> 400",
        ),
        pytest.param("GET", "/v2/_catalog?n=²", {}, 400, "PAGINATION_NUMBER_INVALID", id="catalog n=² -> 400"),
        pytest.param(
            "GET", "/v2/_catalog?n=٣", {}, 400, "PAGINATION_NUMBER_INVALID", id="catalog n=٣ (a non-ASCII digit) -> 400"
        ),
        pytest.param(
            "GET",
            "/v2/alpine/manifests/latest?ns=quay.io",
            {},
            404,
            "NAME_UNKNOWN",
            id="unconfigured ns -> 404 NAME_UNKNOWN",
        ),
        pytest.param(
            "GET",
            "/v2/evil.example/x/manifests/latest",
            {},
            404,
            "NAME_UNKNOWN",
            id="unconfigured host prefix -> 404 NAME_UNKNOWN",
        ),
        pytest.param(
            "GET", "/v2/alpine/manifests/latest?ns=%20", {}, 400, "NAME_INVALID", id="garbage ns -> 400 NAME_INVALID"
        ),
        pytest.param("GET", "/v2/alpine/nonsense/x", {}, 404, "NOT_FOUND", id="unknown endpoint -> 404 NOT_FOUND"),
        pytest.param("DELETE", "/v2/", {}, 405, "UNSUPPORTED", id="wrong method -> 405 UNSUPPORTED"),
    ],
)
async def test_bad_requests(
    mirror_and_fake: tuple[MirrorClient, FakeRegistry],
    tmp_path: Path,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    mirror, fake = mirror_and_fake
    resp = await mirror.request(method, path, headers=headers)
    assert resp.status == status
    if method != "HEAD":
        body = await resp.json()
        assert body["errors"][0]["code"] == code
        assert body["errors"][0]["message"]
    assert fake.requests == [], "bad input must be refused before the upstream is asked"
    found = await asyncio.to_thread(lambda: [p.name for p in tmp_path.rglob("*")])
    assert not any(name in ("passwd", "etc") for name in found)


async def test_bad_range_on_cached_blob_is_416(mirror_and_fake: tuple[MirrorClient, FakeRegistry]) -> None:
    mirror, fake = mirror_and_fake
    digest = fake.add_blob(b"0123456789")
    assert (await mirror.get(f"/v2/alpine/blobs/{digest}")).status == 200
    for header in ("bytes=10-", "bytes=5-2", "bytes=0-1,3-4", "pages=1-2"):
        resp = await mirror.get(f"/v2/alpine/blobs/{digest}", headers={"Range": header})
        assert resp.status == 416, header
        assert resp.headers["Content-Range"] == "bytes */10"
        assert (await resp.json())["errors"][0]["code"] == "RANGE_INVALID"
    resp = await mirror.get(f"/v2/alpine/blobs/{digest}", headers={"Range": "bytes=3-5"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == "bytes 3-5/10"
    assert await resp.read() == b"345"


def fill_database(directory: Path) -> None:
    """Make the diskcache database in ``directory`` full: SQLite may not grow it by a page (``max_page_count``, a
    setting diskcache applies to every connection), and rows of shrinking size fill what room its pages have
    left, so the next write of a record fails with SQLITE_FULL, "database or disk is full", as on a full disk."""
    cache = diskcache.Cache(str(directory), size_limit=2**40, eviction_policy="none")
    pages = cache._sql("PRAGMA page_count").fetchone()[0]
    cache.close()
    cache = diskcache.Cache(str(directory), sqlite_max_page_count=pages)
    n = 0
    for size in (3000, 1000, 300, 100, 30, 10, 1, 0):
        with contextlib.suppress(sqlite3.OperationalError):
            while True:
                cache.set(("filler", n), b"x" * size)
                n += 1
    cache.close()


async def test_cold_manifest_on_a_full_disk_is_507(
    fake_upstream: tuple[FakeRegistry, TestServer], make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    fake, server = fake_upstream
    digest = fake.add_image("library/alpine", "3.19", [b"layer"])
    fill_database(tmp_path / "data" / "index")
    mirror = await make_mirror(str(server.make_url("")))
    for ref in (digest, "3.19"):
        resp = await mirror.get(f"/v2/alpine/manifests/{ref}")
        assert resp.status == 507, ref
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
