"""``mirror serve`` with ``[storage] backend = "s3"``: a real Distribution upstream, the mirror as a process, a real
SeaweedFS bucket. Pulled-through content lands in the bucket (verified), hits are streamed from it (Range passed
through) with zero upstream GETs, and ``redirect = true`` answers 307 to a presigned URL."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.storage.s3writer import PART_SIZE
from tests.support.ops import Mirror, blob_files, run_cli, start_registry, upstream_requests, wait_until
from tests.support.plain_http import pull, push_random_image
from tests.support.redis import redis_server
from tests.support.seaweed import (  # noqa: F401 - seaweed_fixture: the fixture
    Seaweed,
    create_bucket,
    raw_client,
    seaweed_fixture,
    seaweed_server,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, Any], list[bytes]]]:
    workdir = tmp_path_factory.mktemp("registry")
    service, url = start_registry(workdir, access_log=True)
    try:
        layers = [os.urandom(PART_SIZE + 300_000), os.urandom(200_000)]  # a multipart object and a one-part one
        image = push_random_image(url, "library/bucketed", "1", layers)
        yield url, workdir / "registry.log", image, layers
    finally:
        service.stop()


def config_file(path: Path, seaweed: Seaweed, redirect: bool = False) -> Path:
    path.write_text(
        f'[storage]\nbackend = "s3"\nendpoint_url = "{seaweed.endpoint_url}"\nbucket = "{seaweed.bucket}"\n'
        f'region = "{seaweed.region}"\nprefix = "serve/"\naccess_key = "{seaweed.access_key}"\n'
        f'secret_key = "{seaweed.secret_key}"\nredirect = {str(redirect).lower()}\n'
    )
    return path


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=30)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_pull_through_into_the_bucket_and_hits_from_it(
    upstream: tuple[str, Path, dict[str, Any], list[bytes]], seaweed: Seaweed, tmp_path: Path
) -> None:
    url, registry_log, image, layers = upstream
    config = config_file(tmp_path / "mirror.toml", seaweed)
    data_dir = tmp_path / "data"
    with Mirror(data_dir, url, "--config", str(config), "--read-only") as mirror:
        cold = pull(mirror.url, "library/bucketed", "1")  # every digest checked by the puller
        fetched = upstream_requests(registry_log, "GET", "/blobs/")
        assert fetched == 1 + len(layers)

        def stored_objects() -> dict[str, int]:
            listed = raw_client(seaweed.endpoint_url).list_objects_v2(Bucket=seaweed.bucket, Prefix="serve/blobs/")
            return {item["Key"]: item["Size"] for item in listed.get("Contents", [])}

        # A client has its last byte once the digest matched; the object is completed just after.
        wait_until(lambda: len(stored_objects()) == 2 + len(layers), what="every object complete in the bucket")
        stored = stored_objects()
        for digest, size in cold["blobs"].items():
            assert stored[f"serve/blobs/{digest.replace(':', '/')}"] == size
        assert f"serve/blobs/{image['manifest'].replace(':', '/')}" in stored
        assert blob_files(data_dir) == {}, "content is in the bucket, not on local disk"
        assert list((data_dir / "tmp").iterdir()) == [], "no temp file left once the objects are complete"

        warm = pull(mirror.url, "library/bucketed", "1")
        assert warm == cold
        assert upstream_requests(registry_log, "GET", "/blobs/") == fetched, "the warm pull makes no upstream GET"

        big = image["layers"][0]
        status, headers, body = get(f"{mirror.url}/v2/library/bucketed/blobs/{big}", {"Range": "bytes=100-199"})
        assert (status, body) == (206, layers[0][100:200])
        assert headers["Content-Range"] == f"bytes 100-199/{len(layers[0])}"
        start = PART_SIZE - 5
        status, _, body = get(f"{mirror.url}/v2/library/bucketed/blobs/{big}", {"Range": f"bytes={start}-"})
        assert (status, body) == (206, layers[0][start:])
        served = re.search(
            r'^mirror_blob_bytes_served_total\{source="cache",upstream="docker.io"\} (\S+)$', mirror.metrics(), re.M
        )
        assert served is not None and float(served.group(1)) >= sum(map(len, layers)) + 100 + len(layers[0]) - start


def test_redirect_answers_307_to_a_presigned_url(
    upstream: tuple[str, Path, dict[str, Any], list[bytes]], seaweed: Seaweed, tmp_path: Path
) -> None:
    url, registry_log, image, layers = upstream
    config = config_file(tmp_path / "mirror.toml", seaweed, redirect=True)
    with Mirror(tmp_path / "data", url, "--config", str(config), "--read-only") as mirror:
        pull(mirror.url, "library/bucketed", "1")  # fills the bucket (or finds it filled by the test above)
        before = upstream_requests(registry_log, "GET", "/blobs/")
        big = image["layers"][0]
        status, headers, _ = get(f"{mirror.url}/v2/library/bucketed/blobs/{big}")
        assert status == 307
        location = headers["Location"]
        assert location.startswith(seaweed.endpoint_url) and "Signature" in location
        with urllib.request.urlopen(location, timeout=30) as resp:  # no credentials: the signature grants it
            assert resp.read() == layers[0]
        assert upstream_requests(registry_log, "GET", "/blobs/") == before


def test_verify_quarantines_a_corrupted_object_and_the_next_pull_fetches_it_again(
    upstream: tuple[str, Path, dict[str, Any], list[bytes]], seaweed: Seaweed, tmp_path: Path
) -> None:
    """``mirror verify`` beside the server re-hashes the objects in the bucket (the CLI's synchronous client)."""
    url, registry_log, image, layers = upstream
    config = config_file(tmp_path / "mirror.toml", seaweed)
    data_dir = tmp_path / "data"
    common = ("--data-dir", str(data_dir), "--config", str(config))
    with Mirror(data_dir, url, "--config", str(config), "--read-only") as mirror:
        pull(mirror.url, "library/bucketed", "1")
        victim = image["layers"][1]
        key = f"serve/blobs/{victim.replace(':', '/')}"
        raw = raw_client(seaweed.endpoint_url)
        damaged = bytes([layers[1][0] ^ 0x55]) + layers[1][1:]
        raw.put_object(Bucket=seaweed.bucket, Key=key, Body=damaged)

        result = run_cli("verify", *common, check=False)
        assert result.returncode == 1 and f"quarantined {victim}" in result.stdout
        listed = raw.list_objects_v2(Bucket=seaweed.bucket, Prefix="serve/")
        keys = [item["Key"] for item in listed.get("Contents", [])]
        assert key not in keys
        assert any(k.startswith(f"serve/quarantine/{victim.replace(':', '-')}.") for k in keys)

        before = upstream_requests(registry_log, "GET", f"/blobs/{victim}")
        assert pull(mirror.url, "library/bucketed", "1")["blobs"][victim] == len(layers[1])  # digests checked
        assert upstream_requests(registry_log, "GET", f"/blobs/{victim}") == before + 1
        assert "0 did not match" in run_cli("verify", *common).stdout


def test_the_bucket_gone_fails_readiness_and_hits_get_503(
    upstream: tuple[str, Path, dict[str, Any], list[bytes]], tmp_path: Path
) -> None:
    url, _, image, _ = upstream
    with seaweed_server(tmp_path / "own-seaweed") as endpoint_url:  # one of its own: this test kills it
        create_bucket(endpoint_url, "mirror")
        config = config_file(tmp_path / "mirror.toml", Seaweed(endpoint_url, "mirror"))
        with Mirror(tmp_path / "data", url, "--config", str(config), "--read-only") as mirror:
            pull(mirror.url, "library/bucketed", "1")
            assert get(f"{mirror.url}/readyz")[0] == 200
            os.kill(int((tmp_path / "own-seaweed" / "weed.pid").read_text()), signal.SIGKILL)
            wait_until(lambda: get(f"{mirror.url}/readyz")[0] == 503, what="/readyz fails without the bucket")
            status, _, body = get(f"{mirror.url}/v2/library/bucketed/blobs/{image['layers'][0]}")
            assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


def test_readiness_follows_redis_in_a_cluster(
    upstream: tuple[str, Path, dict[str, Any], list[bytes]], seaweed: Seaweed, tmp_path: Path
) -> None:
    """A replica whose Redis is down answers 503 at /readyz (the load balancer stops sending it traffic) and is
    ready again once Redis is back, without a restart."""
    url, _, _, _ = upstream
    with redis_server(tmp_path / "redis") as redis:
        config = config_file(tmp_path / "mirror.toml", seaweed)
        with config.open("a") as file:
            file.write(
                f'[cluster]\nredis_url = "{redis.url}"\nadvertise = "http://127.0.0.1:1"\nsecret = "{"s" * 32}"\n'
            )
        with Mirror(tmp_path / "data", url, "--config", str(config), "--read-only") as mirror:
            assert get(f"{mirror.url}/readyz")[0] == 200
            redis.stop()
            status, _, body = get(f"{mirror.url}/readyz")
            assert status == 503 and b"Redis" in body
            redis.start()
            wait_until(lambda: get(f"{mirror.url}/readyz")[0] == 200, what="/readyz passes with Redis back")
