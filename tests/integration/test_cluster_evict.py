"""The byte cap of a cluster: two replicas (``mirror serve`` processes on data dirs of their own) with one
``--cache-size`` over one bucket (a real SeaweedFS) and one Redis (a real ``redis-server``), in front of a real
Distribution. Pulls spread over both go past the cap; the bucket ends under it, both replicas count what the bucket
holds, the least recently served content is what went (whichever replica served it), every removal is counted once
(by the replica that made it), and one replica evicted at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import metric
from tests.support.ops import Mirror, Service, start_registry, wait_until
from tests.support.plain_http import pull, push_random_image
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration
LIMIT = 2 * 2**20  # --cache-size 2MiB; watermarks 0.95 / 0.85
LAYER = 200 * 2**10
IMAGES = 12  # 2.4 MiB in all: down to the low watermark (1.7 MiB) is 4 images out
EVICTED = re.compile(r"evicted (\d+) entries \((\d+) bytes\) in \S+ \(from (\S+) to (\S+)\)")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str, list[dict[str, Any]]]]:
    service, url = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        images = [push_random_image(url, f"library/app{i}", "latest", [os.urandom(LAYER)]) for i in range(IMAGES)]
        yield service, url, images
    finally:
        service.stop()


def bucket_objects(seaweed: Seaweed, prefix: str) -> dict[str, int]:
    """Digest -> size of every blob and manifest object under ``prefix`` (paged: the listing answers 1000 at once)."""
    found: dict[str, int] = {}
    for page in (
        raw_client(seaweed.endpoint_url)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=seaweed.bucket, Prefix=f"{prefix}blobs/")
    ):
        for item in page.get("Contents", []):
            algorithm, _, hex_ = item["Key"].removeprefix(f"{prefix}blobs/").partition("/")
            found[f"{algorithm}:{hex_}"] = item["Size"]
    return found


def evictions(log: Path) -> list[tuple[float, float, int, int]]:
    """(began, ended, entries, bytes) of every eviction a replica logged."""
    return [
        (float(m.group(3)), float(m.group(4)), int(m.group(1)), int(m.group(2)))
        for m in EVICTED.finditer(log.read_text(errors="replace"))
    ]


def test_two_replicas_keep_one_bucket_under_the_cap_and_evict_the_least_recently_served_once(
    upstream: tuple[Service, str, list[dict[str, Any]]], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    _, url, images = upstream
    prefix = "evict/"
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[storage]\nbackend = "s3"\nendpoint_url = "{seaweed.endpoint_url}"\nbucket = "{seaweed.bucket}"\n'
        f'region = "{seaweed.region}"\nprefix = "{prefix}"\naccess_key = "{seaweed.access_key}"\n'
        f'secret_key = "{seaweed.secret_key}"\n'
        f'[cluster]\nredis_url = "{redis_server.url}"\nadvertise = "http://127.0.0.1:1"\nsecret = "{"s" * 32}"\n'
        "[cache]\nflush_interval = 0.5\n"
    )
    flags = ("--cache-size", "2MiB", "--config", str(config))
    a = Mirror(tmp_path / "a", url, *flags, log=tmp_path / "a.log")
    try:
        b = Mirror(tmp_path / "b", url, *flags, log=tmp_path / "b.log")
    except BaseException:
        a.stop()
        raise
    try:
        replicas = (a, b)

        def pull_one(job: tuple[int, int]) -> None:
            received = pull(replicas[job[0]].url, f"app{job[1]}", "latest")  # raises on any error or wrong byte
            assert set(received["blobs"]) == {images[job[1]]["config"], *images[job[1]]["layers"]}

        # The first half, then app0 and app1 served again (through the other replica than the one that fetched
        # them), then the second half: app2..app5 are the least recently served when the cap is passed.
        first = [(n % 2, n) for n in range(IMAGES // 2)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(pull_one, first))
        pull_one((1, 0))
        pull_one((0, 1))
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(pull_one, [(n % 2, n) for n in range(IMAGES // 2, IMAGES)]))
        pulled = sum(img["bytes"] for img in images)
        assert pulled > LIMIT
        # Each replica leaves what was served in its last few seconds (it cannot see the other one's readers), so
        # the cap is reached a few seconds after the last pull.
        wait_until(
            lambda: sum(bucket_objects(seaweed, prefix).values()) <= 0.95 * LIMIT,
            within=60,
            what="the bucket under the cap",
        )
        # An eviction may still be removing what it chose when the bucket passes under the cap: read the bucket
        # again until both replicas count what it holds.
        seen: dict[str, Any] = {}

        def counted_alike() -> bool:
            seen["stored"] = bucket_objects(seaweed, prefix)
            seen["a"], seen["b"] = metric(a, "mirror_cache_size_bytes"), metric(b, "mirror_cache_size_bytes")
            return bool(seen["a"] == seen["b"] == sum(seen["stored"].values()))

        try:
            wait_until(counted_alike, what="both replicas counting what the bucket holds")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: a {seen['a']}, b {seen['b']}, bucket {sum(seen['stored'].values())}"
            ) from None
        stored = seen["stored"]
        layers = [image["layers"][0] for image in images]
        assert {layers[0], layers[1]} <= set(stored), "served again before the cap was passed: kept"
        gone = [n for n, layer in enumerate(layers) if layer not in stored]
        assert gone and set(gone) <= set(range(2, IMAGES // 2)), f"the least recently served went first: {gone}"
        # Counted once: the removals both replicas counted are the objects that left the bucket.
        every_digest = {d for image in images for d in (image["config"], *image["layers"], image["manifest"])}
        removed = every_digest - set(stored)
        counted = metric(a, "mirror_cache_evictions_total") + metric(b, "mirror_cache_evictions_total")
        assert counted == len(removed), (counted, len(removed))

        # An eviction is logged once its records are gone too, a moment after the bucket and the counts.
        def logged() -> list[tuple[float, float, int, int]]:
            return sorted(evictions(tmp_path / "a.log") + evictions(tmp_path / "b.log"))

        wait_until(lambda: sum(entries for _, _, entries, _ in logged()) >= len(removed), within=10, what="logged")
        runs = logged()
        assert sum(entries for _, _, entries, _ in runs) == len(removed)
        for (_, ended, _, _), (began, _, _, _) in zip(runs, runs[1:], strict=False):
            assert ended <= began, f"two evictions at once: {runs}"
    finally:
        a.stop()
        b.stop()
