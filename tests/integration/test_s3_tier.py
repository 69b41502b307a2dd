"""``mirror serve`` on a SeaweedFS bucket with the local tier (``[storage] local_cache``), a real Distribution
upstream: a pulled-through blob leaves a copy on local disk and its hits are sent from it (Range too), the copies
outlive a restart, and a blob larger than the bound is served from the bucket alone."""

from __future__ import annotations

import os
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ops import Mirror, blob_files, start_registry, upstream_requests, wait_until
from tests.support.plain_http import pull, push_random_image
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, Any], list[bytes]]]:
    workdir = tmp_path_factory.mktemp("registry")
    service, url = start_registry(workdir, access_log=True)
    try:
        layers = [os.urandom(9 * MiB), os.urandom(3 * MiB)]
        yield url, workdir / "registry.log", push_random_image(url, "library/tiered", "1", layers), layers
    finally:
        service.stop()


def config_file(path: Path, seaweed: Seaweed, local_cache: str) -> Path:
    path.write_text(
        f'[storage]\nbackend = "s3"\nendpoint_url = "{seaweed.endpoint_url}"\nbucket = "{seaweed.bucket}"\n'
        f'region = "{seaweed.region}"\nprefix = "tier-{secrets.token_hex(4)}/"\naccess_key = "{seaweed.access_key}"\n'
        f'secret_key = "{seaweed.secret_key}"\nlocal_cache = "{local_cache}"\n'
    )
    return path


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
        return resp.status, resp.read()


def test_hits_are_sent_from_the_local_copy_which_outlives_a_restart(
    upstream: tuple[str, Path, dict[str, Any], list[bytes]], seaweed: Seaweed, tmp_path: Path
) -> None:
    url, registry_log, image, layers = upstream
    config = config_file(tmp_path / "mirror.toml", seaweed, "64MiB")
    data_dir = tmp_path / "data"
    prefix = config.read_text().split('prefix = "', 1)[1].split('"', 1)[0]
    with Mirror(data_dir, url, "--config", str(config)) as mirror:
        cold = pull(mirror.url, "library/tiered", "1")
        # A client has its last byte once the digest matched; the object and the copy come just after.
        wait_until(lambda: set(cold["blobs"]) <= set(blob_files(data_dir)), what="each fetched blob left its copy")
        # The bucket's object overwritten behind the mirror's back: the bytes still served are the copy's.
        big = image["layers"][0]
        raw_client(seaweed.endpoint_url).put_object(
            Bucket=seaweed.bucket, Key=f"{prefix}blobs/{big.replace(':', '/')}", Body=b"\0" * len(layers[0])
        )
        assert get(f"{mirror.url}/v2/library/tiered/blobs/{big}") == (200, layers[0])
        assert get(f"{mirror.url}/v2/library/tiered/blobs/{big}", {"Range": "bytes=5-9"}) == (206, layers[0][5:10])
    with Mirror(data_dir, url, "--config", str(config)) as mirror:
        assert get(f"{mirror.url}/v2/library/tiered/blobs/{big}") == (200, layers[0]), "the copy, after a restart"
    assert upstream_requests(registry_log, "GET", f"/blobs/{big}") == 1


def test_a_blob_larger_than_the_bound_is_served_from_the_bucket(
    upstream: tuple[str, Path, dict[str, Any], list[bytes]], seaweed: Seaweed, tmp_path: Path
) -> None:
    url, _, image, layers = upstream
    config = config_file(tmp_path / "mirror.toml", seaweed, "4MiB")
    data_dir = tmp_path / "data"
    with Mirror(data_dir, url, "--config", str(config)) as mirror:
        pull(mirror.url, "library/tiered", "1")
        pull(mirror.url, "library/tiered", "1")  # hits: the big one read from the bucket again
        stored = blob_files(data_dir)
        assert image["layers"][0] not in stored and image["layers"][1] in stored
        assert sum(stored.values()) <= 4 * MiB
        assert get(f"{mirror.url}/v2/library/tiered/blobs/{image['layers'][0]}") == (200, layers[0])
