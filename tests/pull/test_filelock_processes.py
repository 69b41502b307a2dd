"""Fetch coordination across real mirror processes on one data dir (``Config.coordination = "files"``), in front of
a real Distribution registry slowed by nginx: 32 clients of a cold blob spread over two processes make one upstream
GET, and kill -9 of the process fetching a blob mid-way hands the fetch to the other, which continues it with a
Range request for the rest while its clients stream on."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.storage.blobs import BlobStore
from tests.support.ops import (
    Mirror,
    blob_files,
    coordinated_mirrors,
    eventually,
    nginx_requests,
    record_figures,
    run_cli,
    throttled_upstream,
    upstream_requests,
    wait_until,
)
from tests.support.plain_http import push_blob

BIG = 8 * 2**20


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with throttled_upstream(
        tmp_path_factory.mktemp("filelock"), slow="1m"
    ) as upstream:  # ~1 s for the blob at 8 MB/s, ~8 s at 1 MB/s
        yield upstream


def blob_url(mirror: Mirror, repo: str, digest: str) -> str:
    return f"{mirror.url}/v2/{repo}/blobs/{digest}"


def metric(mirror: Mirror, name: str, label: str = "") -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in mirror.metrics().splitlines()
        if line.startswith(name + "{") and label in line
    )


def leftovers(data: Path) -> list[str]:
    return sorted(p.name for p in BlobStore(data).tmp_dir.iterdir())


@pytest.mark.integration
async def test_32_cold_gets_over_two_processes_make_one_upstream_get(upstream: dict[str, Any], tmp_path: Path) -> None:
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/herd", data)
    first, second = coordinated_mirrors(tmp_path / "data", upstream["herd"])
    try:
        async with aiohttp.ClientSession() as session:

            async def get(mirror: Mirror) -> str:
                async with session.get(blob_url(mirror, "library/herd", digest)) as resp:
                    assert resp.status == 200
                    return hashlib.sha256(await resp.read()).hexdigest()

            began = time.monotonic()
            bodies = await asyncio.gather(*(get(first if n % 2 else second) for n in range(32)))
            record_figures("filelock herd", clients=32, processes=2, seconds=round(time.monotonic() - began, 3))
        assert bodies == [digest.partition(":")[2]] * 32  # every body verified
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1
        # Both processes streamed the blob while it arrived: the one without the upstream GET followed the other.
        served = 'source="upstream"'
        assert metric(first, "mirror_blob_bytes_served_total", served) == 16 * BIG
        assert metric(second, "mirror_blob_bytes_served_total", served) == 16 * BIG
        wait_until(lambda: blob_files(tmp_path / "data").get(digest) == BIG, what="the blob stored")
        assert leftovers(tmp_path / "data") == []
    finally:
        first.stop()
        second.stop()


@pytest.mark.integration
async def test_kill_9_of_the_fetching_process_is_continued_by_the_other_with_a_range_request(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/crash", data)
    store = tmp_path / "data"
    leader, follower = coordinated_mirrors(store, upstream["slow"])
    received = [0] * 9
    try:
        async with aiohttp.ClientSession() as session:

            async def get(mirror: Mirror, n: int) -> str:
                hasher = hashlib.sha256()
                async with session.get(blob_url(mirror, "library/crash", digest)) as resp:
                    assert resp.status == 200
                    async for chunk in resp.content.iter_any():
                        hasher.update(chunk)
                        received[n] += len(chunk)
                return hasher.hexdigest()

            first = asyncio.ensure_future(get(leader, 0))
            await eventually(lambda: received[0] > 0, what="the leader streaming")
            rest = [asyncio.ensure_future(get(follower, n)) for n in range(1, 9)]
            await eventually(lambda: all(received[1:]), what="the follower's clients streaming")
            leader.kill9()
            at_kill = min(received[1:])
            began = time.monotonic()
            outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
            after_kill = round(time.monotonic() - began, 3)
        assert isinstance(outcomes[0], aiohttp.ClientError), "the dead process's own client is cut"
        assert outcomes[1:] == [digest.partition(":")[2]] * 8, "every client of the other process completes"
        assert received[1:] == [BIG] * 8
        # The upstream saw the first GET and one Range request for the rest, from where the dead one stopped.
        requests = nginx_requests(upstream["slow_dir"], f"/blobs/{digest}", at_least=2)
        ranged = [(status, rng) for _, status, rng in requests if rng != "-"]
        assert len(requests) == 2 and len(ranged) == 1, requests
        status, rng = ranged[0]
        start = int(rng.removeprefix("bytes=").removesuffix("-"))
        assert status == 206 and rng == f"bytes={start}-" and at_kill <= start < BIG, ranged
        record_figures("filelock resume", blob=BIG, range_start=start, seconds_after_kill=after_kill)
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 2
        # No byte fetched twice by the one that took over: it received the rest only.
        assert metric(follower, "mirror_upstream_bytes_fetched_total") == BIG - start
        wait_until(lambda: blob_files(store).get(digest) == BIG, what="the blob stored")
        wait_until(lambda: leftovers(store) == [], what="nothing partial left in tmp/")
        assert "0 did not match" in run_cli("verify", "--data-dir", str(store)).stdout
    finally:
        leader.stop()
        follower.stop()
