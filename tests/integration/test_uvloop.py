"""``--uvloop``: the same bytes on every path. uvloop has no ``loop.sendfile``, which the miss path uses to send a
growing temp file; without the fallback a cold blob GET was cut after its headers."""

from __future__ import annotations

import concurrent.futures
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ops import Mirror, Service, start_registry
from tests.support.plain_http import push_blob, sha256

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str]]:
    registry, url = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield registry, url
    finally:
        registry.stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as resp:
        return resp.status, resp.read()


def test_cold_warm_and_ranged_blob_gets_on_uvloop(upstream: tuple[Service, str], tmp_path: Path) -> None:
    data = os.urandom(4 * MiB + 123)
    digest = push_blob(upstream[1], "library/uv", data)
    small = os.urandom(1024)
    small_digest = push_blob(upstream[1], "library/uv", small)
    mirror = Mirror(tmp_path / "data", upstream[1], "--uvloop", log=tmp_path / "mirror.log")
    try:
        url = f"{mirror.url}/v2/library/uv/blobs/{digest}"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            cold = list(pool.map(lambda _: get(url), range(8)))  # one fetch, eight readers of the temp file
        assert [(status, sha256(body)) for status, body in cold] == [(200, digest)] * 8
        assert get(f"{mirror.url}/v2/library/uv/blobs/{small_digest}") == (200, small)
        assert get(url) == (200, data)  # warm: from the cache
        assert get(url, {"Range": f"bytes={MiB}-"}) == (206, data[MiB:])
        assert "event loop: uvloop" in mirror.log.read_text()
    finally:
        mirror.stop()
