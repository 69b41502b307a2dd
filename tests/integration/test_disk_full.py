"""A full disk during a fetch: the client gets a clear 507 when the announced size does not fit, or a cut
connection (never wrong bytes) when the disk fills half-way; the partial file is removed; hits keep working.

The data dir is a 3 MiB tmpfs mounted for the test (needs root, as the CI runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ops import Mirror, blob_files, run_cli, start_nginx, start_registry, wait_until
from tests.support.plain_http import pull, push_random_image

pytestmark = pytest.mark.integration
MiB = 2**20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(data)], capture_output=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs for the disk-full test: {mounted.stderr.decode().strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_disk_full_during_fetch(small_disk: Path, tmp_path: Path) -> None:
    registry, url = start_registry(tmp_path / "registry")
    # 4 MB/s per download: the two concurrent fetches below overlap, so one meets ENOSPC half-way.
    nginx, slow_url = start_nginx(tmp_path / "nginx", url, throttle="4m")
    mirror = None
    try:
        small = push_random_image(url, "library/small", "latest", [os.urandom(100_000)])
        huge = push_random_image(url, "library/huge", "latest", [os.urandom(4 * MiB)])
        mids = [push_random_image(url, f"library/mid{i}", "latest", [os.urandom(MiB + MiB // 2)]) for i in range(2)]
        mirror = Mirror(small_disk, slow_url, log=tmp_path / "mirror.log")
        pull(mirror.url, "small", "latest")

        # Larger than the free space: refused before a byte is written, with a registry error.
        get(f"{mirror.url}/v2/huge/manifests/latest")
        status, body = get(f"{mirror.url}/v2/huge/blobs/{huge['layers'][0]}")
        assert status == 507
        assert "disk is full" in json.loads(body)["errors"][0]["message"]
        assert list((small_disk / "tmp").iterdir()) == []

        # Two fetches that each fit but not together: one fails (507, or cut if the disk fills half-way).
        results: list[Any] = [None, None]

        def fetch(i: int) -> None:
            try:
                results[i] = pull(mirror.url, f"mid{i}", "latest")
            except Exception as exc:
                results[i] = exc

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert any(isinstance(r, Exception) for r in results), results
        # The failed fetch's file is removed; a finished one's is published just after its client's last byte.
        wait_until(lambda: list((small_disk / "tmp").iterdir()) == [], what="partial files removed")
        files = blob_files(small_disk)
        for i, result in enumerate(results):
            if not isinstance(result, Exception):
                assert mids[i]["layers"][0] in files

        # Hits keep working, and nothing in the store is corrupt.
        received = pull(mirror.url, "small", "latest")
        assert set(received["blobs"]) == {small["config"], *small["layers"]}
        assert "0 did not match" in run_cli("verify", "--data-dir", str(small_disk)).stdout
        assert (urllib.request.urlopen(f"{mirror.url}/readyz", timeout=10)).status == 200
    finally:
        if mirror is not None:
            mirror.stop()
        nginx.stop()
        registry.stop()
