"""Eviction with real pulls: a Distribution registry upstream, the mirror as a subprocess with ``--cache-size``,
images pulled over HTTP like a client does, ``mirror pin`` run beside the server.

Asserted: the least recently served content goes first (everything evicted was served before everything kept,
pins aside), the pinned image stays, shared layers are counted once, an evicted image is fetched again
transparently, the cache never exceeds the limit by more than one blob in flight (a thread samples the disk
throughout), and the index matches the disk afterwards.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ops import DiskWatch, Mirror, blob_files, record_figures, run_cli, start_registry, wait_until
from tests.support.plain_http import pull, push_random_image

pytestmark = pytest.mark.integration
LIMIT = 2 * 2**20  # --cache-size 2MiB; watermarks 0.95 / 0.85 (the defaults)
LAYER = 256 * 2**10
BASE = 128 * 2**10  # a base layer every image shares: stored and counted once
IMAGES = 8


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    service, url = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        base = os.urandom(BASE)
        images = [push_random_image(url, f"library/app{i}", "latest", [base, os.urandom(LAYER)]) for i in range(IMAGES)]
        yield url, images
    finally:
        service.stop()


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def settled(mirror: Mirror) -> bool:
    text = mirror.metrics()
    used = metric(text, "mirror_cache_size_bytes") + metric(text, "mirror_cache_pending_bytes")
    return used <= 0.95 * LIMIT


def test_eviction_with_real_pulls(upstream: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    url, images = upstream
    data = tmp_path / "data"
    mirror = Mirror(data, url, "--cache-size", "2MiB", log=tmp_path / "mirror.log")
    served: dict[str, int] = {}  # digest -> index of the request that last received it
    clock = 0

    def pull_image(i: int) -> None:
        nonlocal clock
        received = pull(mirror.url, f"app{i}", "latest")
        # Stored just after the client had its last byte: each image in the cache before the next is pulled.
        wait_until(lambda: set(received["blobs"]) <= set(blob_files(data)), what=f"app{i} stored")
        for digest in [received["manifest"], *received["blobs"]]:
            clock += 1
            served[digest] = clock

    try:
        with DiskWatch(data) as watch:
            for i in range(6):
                pull_image(i)
            first = blob_files(data)
            assert sum(first.values()) == BASE + sum(img["bytes"] - BASE for img in images[:6])  # base counted once
            assert (
                "mirror_cache_evictions_total" not in mirror.metrics()
                or metric(mirror.metrics(), "mirror_cache_evictions_total", 'kind="blob"') == 0
            )
            pull_image(0)  # served again: now among the most recent
            pull_image(1)
            run_cli("pin", "--data-dir", str(data), "app2:latest")  # beside the running server
            for i in range(6, IMAGES):
                pull_image(i)
                wait_until(lambda: settled(mirror), what="eviction to the low watermark")
        files = blob_files(data)
        text = mirror.metrics()

        pinned = {images[2]["manifest"], images[2]["config"], *images[2]["layers"]}
        assert pinned <= set(files), "the pinned image must stay"
        evicted = set(served) - set(files)
        kept = set(files) - pinned
        assert evicted, "the pulls went past the limit, something must have been evicted"
        assert max(served[d] for d in evicted) < min(served[d] for d in kept), "least recently served go first"
        # app0 and app1 were fetched first but served again: app3 and app4 (fetched later, never served again) go.
        assert {i for i in range(IMAGES) if images[i]["layers"][1] not in files} == {3, 4}
        assert sum(files.values()) <= LIMIT
        assert watch.peak <= LIMIT + LAYER, f"disk peaked at {watch.peak} bytes"
        assert metric(text, "mirror_cache_size_bytes") == sum(files.values())

        # An evicted image comes back transparently, fetched again from the upstream.
        victim = next(i for i in range(IMAGES) if images[i]["layers"][1] in evicted)
        fetched = metric(text, "mirror_upstream_requests_total", 'kind="blob",outcome="ok",upstream="docker.io"')
        pull_image(victim)
        after = metric(
            mirror.metrics(), "mirror_upstream_requests_total", 'kind="blob",outcome="ok",upstream="docker.io"'
        )
        assert after > fetched
        wait_until(lambda: settled(mirror), what="eviction after the re-pull")

        # The index matches the disk: a reconciling dry run finds nothing to add or drop.
        check = run_cli("gc", "--dry-run", "--data-dir", str(data))
        assert "0 stale records dropped, 0 missing records rebuilt" in check.stdout
        text = mirror.metrics()
        record_figures(
            "eviction",
            limit=LIMIT,
            high=int(0.95 * LIMIT),
            low=int(0.85 * LIMIT),
            pulled_bytes=sum(img["bytes"] for img in images) - (IMAGES - 1) * BASE,
            evictions=metric(text, "mirror_cache_evictions_total", 'kind="blob"')
            + metric(text, "mirror_cache_evictions_total", 'kind="manifest"'),
            evicted_bytes=metric(text, "mirror_cache_evicted_bytes_total", 'kind="blob"')
            + metric(text, "mirror_cache_evicted_bytes_total", 'kind="manifest"'),
            peak_disk=watch.peak,
            disk_samples=watch.samples,
            final_size=sum(blob_files(data).values()),
        )
    finally:
        mirror.stop()
