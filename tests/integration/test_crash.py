"""kill -9 of the mirror in the middle of an upstream fetch, then a restart on the same data dir: the temp file
of the interrupted fetch is gone, the index matches the disk, nothing corrupt is served, and the blob is
fetched again in full.

nginx with ``limit_rate`` in front of the Distribution registry makes the fetch slow enough to interrupt.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ops import Mirror, blob_files, run_cli, start_nginx, start_registry, wait_until
from tests.support.plain_http import pull, push_random_image

pytestmark = pytest.mark.integration
BIG = 4 * 2**20


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("crash")
    registry, url = start_registry(work / "registry")
    nginx, slow_url = start_nginx(work / "nginx", url, throttle="1m")  # 1 MB/s per download
    try:
        small = push_random_image(url, "library/small", "latest", [os.urandom(50_000)])
        big = push_random_image(url, "library/big", "latest", [os.urandom(BIG)])
        yield {"url": url, "slow_url": slow_url, "small": small, "big": big}
    finally:
        nginx.stop()
        registry.stop()


def test_kill_9_during_a_fetch_then_restart(upstream: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "data"
    mirror = Mirror(data, upstream["slow_url"], "--cache-size", "1GiB", log=tmp_path / "mirror-1.log")
    try:
        cached = pull(mirror.url, "small", "latest")["blobs"]  # cached before the crash
        # A client has its last byte once the digest matched; the store publishes just after.
        wait_until(lambda: set(cached) <= set(blob_files(data)), what="the small image stored")
        outcome: list[BaseException | dict[str, Any]] = []
        thread = threading.Thread(target=lambda: _catch(outcome, mirror.url), daemon=True)
        thread.start()
        # Wait until the big layer is being written to a temp file, then kill the mirror without warning.
        wait_until(lambda: any(p.stat().st_size > 0 for p in (data / "tmp").iterdir()), what="a partial temp file")
        mirror.kill9()
    finally:
        mirror.stop()
    thread.join(30)
    assert outcome and isinstance(outcome[0], BaseException), "the client must not get the whole blob"
    partial = list((data / "tmp").iterdir())
    assert partial and all(p.stat().st_size < BIG for p in partial)
    assert upstream["big"]["layers"][0] not in blob_files(data)

    mirror = Mirror(data, upstream["url"], "--cache-size", "1GiB", "--admin-api", log=tmp_path / "mirror-2.log")
    try:
        assert list((data / "tmp").iterdir()) == [], "start-up removes temp files of interrupted fetches"
        files = blob_files(data)
        stats = json.loads(run_cli("stats", "--json", "--data-dir", str(data)).stdout)
        assert stats["size_bytes"] == sum(files.values())
        assert sum(stats["entries"].values()) == len(files)
        verify = run_cli("verify", "--data-dir", str(data))
        assert "0 did not match" in verify.stdout  # nothing corrupt in the store
        pull(mirror.url, "small", "latest")  # the content cached before the crash is served (digests checked)
        received = pull(mirror.url, "big", "latest")  # fetched again, in full, verified by digest
        assert received["blobs"][upstream["big"]["layers"][0]] == BIG
        wait_until(lambda: blob_files(data).get(upstream["big"]["layers"][0]) == BIG, what="the big layer stored")
    finally:
        mirror.stop()


def _catch(outcome: list[BaseException | dict[str, Any]], url: str) -> None:
    try:
        outcome.append(pull(url, "big", "latest"))
    except BaseException as exc:
        outcome.append(exc)
