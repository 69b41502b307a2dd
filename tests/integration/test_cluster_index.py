"""Two replicas (``mirror serve`` processes on data dirs of their own) sharing one bucket (a real SeaweedFS) and one
Redis (a real ``redis-server``), in front of a real Distribution: what one replica cached, the other serves from the
shared index without asking the upstream again, a replica joining later drops none of it, and Redis going away
costs the clients 503 UNAVAILABLE (never a 500) until it is back, with no replica restarted. A push through one
replica is pulled through the other, which routes the new local name as local at once, and a delete through
either is seen by both."""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.support.ops import Mirror, Service, free_port, run_cli, start_registry, upstream_requests, wait_until
from tests.support.plain_http import pull, push_random_image
from tests.support.redis import RedisServer, redis_server
from tests.support.seaweed import Seaweed, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration
NAME = "library/shared"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Upstream:
    service: Service
    url: str
    log: Path
    image: dict[str, Any]

    def gets(self, path_part: str) -> int:
        return upstream_requests(self.log, "GET", path_part)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    """A Distribution of each test's own (a test may stop it) holding ``library/shared:1`` and ``:2``."""
    service, url = start_registry(tmp_path / "registry", access_log=True)
    try:
        image = push_random_image(url, NAME, "1", [os.urandom(300_000), os.urandom(1000)])
        push_random_image(url, NAME, "2", [os.urandom(2000)])
        yield Upstream(service, url, tmp_path / "registry" / "registry.log", image)
    finally:
        service.stop()


def cluster_config(path: Path, seaweed: Seaweed, redis: RedisServer) -> Path:
    """Both replicas' configuration: one bucket prefix (this test's own), one Redis."""
    path.write_text(
        f'[storage]\nbackend = "s3"\nendpoint_url = "{seaweed.endpoint_url}"\nbucket = "{seaweed.bucket}"\n'
        f'region = "{seaweed.region}"\nprefix = "{path.parent.name}/"\naccess_key = "{seaweed.access_key}"\n'
        f'secret_key = "{seaweed.secret_key}"\n'
        f'[cluster]\nredis_url = "{redis.url}"\nadvertise = "http://127.0.0.1:1"\nsecret = "{"s" * 32}"\n'
    )
    return path


def replica(tmp_path: Path, name: str, upstream: Upstream, config: Path, *flags: str) -> Mirror:
    return Mirror(tmp_path / name, upstream.url, "--config", str(config), *flags)


def get(url: str, accept: str = OCI_MANIFEST) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=30)
    try:
        conn.request("GET", parts.path, headers={"Accept": accept})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def answers(url: str, status: int) -> bool:
    """Whether ``url`` answers ``status`` (False while nothing listens there yet)."""
    try:
        return get(url)[0] == status
    except OSError:
        return False


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def test_a_tag_cached_through_one_replica_is_served_by_another(
    upstream: Upstream, seaweed: Seaweed, tmp_path: Path
) -> None:
    with redis_server(tmp_path / "redis") as redis:
        config = cluster_config(tmp_path / "mirror.toml", seaweed, redis)
        with replica(tmp_path, "a", upstream, config) as a:
            cold = pull(a.url, NAME, "1")  # every digest checked by the puller
            by_tag, manifests, blobs = (
                upstream.gets("/manifests/1"),
                upstream.gets("/manifests/"),
                upstream.gets("/blobs/"),
            )
            assert by_tag == 1 and blobs == len(cold["blobs"])
            # B starts after A cached: its start-up (reconciling the index with the bucket) drops none of A's records.
            with replica(tmp_path, "b", upstream, config) as b:
                assert pull(b.url, NAME, "1") == cold
                assert upstream.gets("/manifests/1") == by_tag, "B read A's tag record: no upstream GET by tag"
                assert upstream.gets("/manifests/") == manifests, "and A's manifest record: none by digest either"
                assert upstream_requests(upstream.log, "HEAD", "/manifests/") == 0, "within the TTL: no revalidation"
                assert upstream_requests(upstream.log, "HEAD", "/blobs/") == 0, "A's origins vouch for the blobs"
                assert upstream.gets("/blobs/") == blobs, "the blobs are in the bucket: no upstream GET"

                # The CLI on a data dir of its own reads the shared index too (``housekeeping.open_admin``).
                cli = run_cli("ls", "--json", "--data-dir", str(tmp_path / "cli"), "--config", str(config))
                listed = {r["repo"]: [t["tag"] for t in r["tags"]] for r in json.loads(cli.stdout)}
                assert listed == {f"docker.io/{NAME}": ["1"]}

                upstream.service.stop()  # the upstream gone, tags/list answers the cached tags: those A cached
                status, body = get(f"{b.url}/v2/{NAME}/tags/list", "application/json")
                assert (status, json.loads(body)["tags"]) == (200, ["1"])


def test_a_push_through_one_replica_is_pulled_through_the_other_and_a_delete_is_seen_by_both(
    upstream: Upstream, seaweed: Seaweed, tmp_path: Path
) -> None:
    with redis_server(tmp_path / "redis") as redis:
        config = cluster_config(tmp_path / "mirror.toml", seaweed, redis)
        with replica(tmp_path, "a", upstream, config) as a, replica(tmp_path, "b", upstream, config) as b:
            # Both replicas are running and have read the (empty) list of local names before the push.
            pushed = {}
            for name in ("team/app", "team/other"):
                pushed[name] = push_random_image(a.url, name, "v1", [os.urandom(200_000), os.urandom(1000)])
                # Straight after the push: the other replica routes the new name as local, not to the upstream.
                got = pull(b.url, name, "v1")
                assert got["manifest"] == pushed[name]["manifest"]
                assert set(got["blobs"]) == {*pushed[name]["layers"], pushed[name]["config"]}
            assert upstream_requests(upstream.log, "GET", "/team/") == 0
            assert upstream_requests(upstream.log, "HEAD", "/team/") == 0

            digest = pushed["team/other"]["manifest"]
            status, _ = request("DELETE", f"{b.url}/v2/team/other/manifests/{digest}")
            assert status == 202
            for mirror in (a, b):
                status, body = get(f"{mirror.url}/v2/team/other/manifests/{digest}")
                assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
                status, body = get(f"{mirror.url}/v2/team/other/manifests/v1")
                assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
                assert pull(mirror.url, "team/app", "v1")["manifest"] == pushed["team/app"]["manifest"]


def request(method: str, url: str) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=30)
    try:
        conn.request(method, parts.path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def traffic(mirror: Mirror, layer: str, statuses: Counter[str], stop: threading.Event) -> None:
    """A tag, its manifest's blob, and a cold tag, over and over, until ``stop``: every answer counted."""
    paths = (f"/v2/{NAME}/manifests/1", f"/v2/{NAME}/blobs/{layer}", f"/v2/{NAME}/manifests/nonexistent")
    while not stop.is_set():
        for path in paths:
            status, body = get(mirror.url + path)
            statuses[f"{status} {error_code(body)}" if status >= 400 else str(status)] += 1


def recovered(statuses: Counter[str], *mirrors: Mirror) -> None:
    """Every replica ready again and the traffic answered again, none of them restarted."""
    for mirror in mirrors:
        wait_until(partial(lambda m: get(f"{m.url}/readyz")[0] == 200, mirror), what="ready with Redis back")
    settled = statuses["200"]
    wait_until(lambda: statuses["200"] >= settled + 10, what="traffic answered again")


def test_redis_gone_gives_503_never_500_and_the_replicas_recover_without_a_restart(
    upstream: Upstream, seaweed: Seaweed, tmp_path: Path
) -> None:
    with redis_server(tmp_path / "redis") as redis:
        config = cluster_config(tmp_path / "mirror.toml", seaweed, redis)
        with replica(tmp_path, "a", upstream, config) as a, replica(tmp_path, "b", upstream, config) as b:
            cold = pull(a.url, NAME, "1")
            assert pull(b.url, NAME, "1") == cold
            statuses: Counter[str] = Counter()
            stop = threading.Event()
            layer = upstream.image["layers"][0]
            threads = [threading.Thread(target=traffic, args=(m, layer, statuses, stop)) for m in (a, b)]
            for thread in threads:
                thread.start()
            try:
                wait_until(lambda: statuses["200"] >= 10, what="traffic answered")
                redis.stop()
                for mirror in (a, b):  # what needs the index (a tag this replica never looked up) is 503 meanwhile
                    status, body = get(f"{mirror.url}/v2/{NAME}/manifests/2")
                    assert (status, error_code(body)) == (503, "UNAVAILABLE")
                wait_until(lambda: statuses["503 UNAVAILABLE"] >= 2, what="the traffic met Redis down")
                redis.start()  # the same port, empty (no persistence): a restart that lost everything
                recovered(statuses, a, b)
                redis.restart()  # and once more at once, under the traffic
                recovered(statuses, a, b)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
            assert set(statuses) <= {"200", "503 UNAVAILABLE", "404 MANIFEST_UNKNOWN"}, statuses

            before = upstream.gets("/manifests/2")
            assert pull(b.url, NAME, "2")["blobs"]  # recorded in the restarted Redis by B ...
            assert pull(a.url, NAME, "2")["blobs"]
            assert upstream.gets("/manifests/2") == before + 1, "... and read from there by A"
    for log in tmp_path.glob("mirror-*.log"):  # both replicas' logs: Redis down never reached the 500 handler
        assert "unexpected error" not in log.read_text(), log.read_text()[-3000:]


def test_a_replica_started_while_redis_is_down_becomes_ready_when_it_is_back(
    upstream: Upstream, seaweed: Seaweed, tmp_path: Path
) -> None:
    """Start-up does not need Redis: the replica serves unready (so a load balancer keeps traffic away), says in its
    log what it could not do, and is ready once Redis answers."""
    with redis_server(tmp_path / "redis") as redis:
        config = cluster_config(tmp_path / "mirror.toml", seaweed, redis)
        redis.stop()
        port = free_port()
        log = tmp_path / f"mirror-127.0.0.1-{port}.log"
        started: list[Mirror] = []

        def start() -> None:  # Mirror returns once /readyz answers 200
            started.append(
                Mirror(tmp_path / "a", upstream.url, "--config", str(config), "--read-only", listen=f"127.0.0.1:{port}")
            )

        thread = threading.Thread(target=start)
        thread.start()
        try:
            wait_until(partial(answers, f"http://127.0.0.1:{port}/readyz", 503), what="serving unready, Redis down")
            assert "not reconciled" in log.read_text()
            redis.start()
            thread.join()
            assert started, "not ready once Redis answered (see the warning of the thread above)"
            assert pull(started[0].url, NAME, "1")["blobs"]
        finally:
            thread.join()
            for mirror in started:
                mirror.stop()
