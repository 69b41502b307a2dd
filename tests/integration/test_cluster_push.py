"""Chunked pushes across replicas: two real ``mirror serve`` replicas sharing a real SeaweedFS bucket and a real
Redis. A session lives on the replica that opened it; its PATCH, GET, PUT and DELETE reaching the other replica
are forwarded there (``api.forward``), so a push whose requests a load balancer spreads works, the blob pulls
back through either replica, and a session whose holder is gone is BLOB_UPLOAD_UNKNOWN (the client starts the
upload again), never a 500 or a half-stored blob. A webhook configured on both replicas gets a push once, even when
the replica it reached dies before the webhook answered."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mirror.upstream.peers import SECRET_HEADER
from tests.support.cluster import SECRET, replica_config
from tests.support.ops import Mirror, free_port, start_registry, wait_until
from tests.support.plain_http import OCI_MANIFEST, exchange, pull
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture
from tests.support.seaweed import Seaweed, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service, url = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield url
    finally:
        service.stop()


def two_replicas(
    stack: ExitStack, upstream: str, seaweed: Seaweed, redis: RedisServer, work: Path, *flags: str
) -> list[Mirror]:
    """Two replicas, each advertising its own URL, on a bucket prefix of this test's own."""
    prefix = f"push-{secrets.token_hex(4)}/"
    started = []
    for n in range(2):
        listen = f"127.0.0.1:{free_port()}"
        config = replica_config(work / f"replica-{n}.toml", seaweed, redis.url, prefix, f"http://{listen}")
        started.append(stack.enter_context(Mirror(work / f"data-{n}", upstream, "--config", str(config), *flags,
                                                  listen=listen)))  # fmt: skip
    return started


@pytest.fixture
def pair(upstream: str, seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Mirror]]:
    with ExitStack() as stack:
        yield two_replicas(stack, upstream, seaweed, redis_server, tmp_path)


def request(
    mirror: Mirror, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return exchange(mirror.url, method, path, body, headers)


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def chunk(mirror: Mirror, location: str, data: bytes, start: int) -> tuple[int, dict[str, str], bytes]:
    span = {"Content-Range": f"{start}-{start + len(data) - 1}", "Content-Type": "application/octet-stream"}
    return request(mirror, "PATCH", location, data, span)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_chunked_push_spread_over_two_replicas_completes_and_pulls_back_through_both(pair: list[Mirror]) -> None:
    a, b = pair
    layer, config = os.urandom(3 * 2**20 + 7), json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    status, headers, body = request(a, "POST", "/v2/team/spread/blobs/uploads/")
    assert status == 202, body
    location, third = headers["Location"], len(layer) // 3

    status, headers, body = chunk(b, location, layer[:third], 0)  # forwarded to A, which holds the session
    assert (status, headers["Range"]) == (202, f"0-{third - 1}"), body
    status, headers, _ = chunk(a, location, layer[third : 2 * third], third)
    assert (status, headers["Range"]) == (202, f"0-{2 * third - 1}")
    status, headers, _ = request(b, "GET", location)
    assert (status, headers["Range"], headers["Docker-Upload-UUID"]) == (
        204,
        f"0-{2 * third - 1}",
        location.rpartition("/")[2],
    )
    status, _, body = chunk(b, location, layer[third:], third)  # out of order through B: A's 416, passed on
    assert (status, error_code(body)) == (416, "RANGE_INVALID")
    status, headers, body = chunk(b, location, layer[2 * third :], 2 * third)
    assert status == 202, body
    status, headers, body = request(b, "PUT", f"{location}?digest={sha256(layer)}")
    assert (status, headers["Docker-Content-Digest"]) == (201, sha256(layer)), body
    assert headers["Location"] == f"/v2/team/spread/blobs/{sha256(layer)}"

    # The config blob in one request through B (a session B opens and holds), then the manifest through A.
    status, headers, _ = request(b, "POST", "/v2/team/spread/blobs/uploads/")
    status, _, body = request(b, "PUT", f"{headers['Location']}?digest={sha256(config)}", config,
                              {"Content-Type": "application/octet-stream"})  # fmt: skip
    assert status == 201, body
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer), "size": len(layer)}],
    }).encode()  # fmt: skip
    status, _, body = request(a, "PUT", "/v2/team/spread/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
    assert status == 201, body
    for mirror in (a, b):
        assert pull(mirror.url, "team/spread", "v1") == {
            "manifest": sha256(manifest),
            "blobs": {sha256(config): len(config), sha256(layer): len(layer)},
        }


def test_a_cancel_through_the_other_replica_ends_the_session_and_an_unknown_one_is_404(pair: list[Mirror]) -> None:
    a, b = pair
    status, headers, _ = request(a, "POST", "/v2/team/cancelled/blobs/uploads/")
    location = headers["Location"]
    assert chunk(b, location, b"x" * 1000, 0)[0] == 202
    assert request(b, "DELETE", location)[0] == 204
    for mirror in (a, b):
        status, _, body = request(mirror, "GET", location)
        assert (status, error_code(body)) == (404, "BLOB_UPLOAD_UNKNOWN")
    unknown = "/v2/team/cancelled/blobs/uploads/0b6a2c1e-8d4f-4e2a-9c3b-5d6e7f8a9b0c"
    status, _, body = chunk(b, unknown, b"y", 0)
    assert (status, error_code(body)) == (404, "BLOB_UPLOAD_UNKNOWN")


def test_a_session_whose_replica_is_gone_is_unknown_and_the_holders_endpoint_wants_the_secret(
    pair: list[Mirror],
) -> None:
    a, b = pair
    status, headers, _ = request(a, "POST", "/v2/team/orphan/blobs/uploads/")
    location, uuid = headers["Location"], headers["Docker-Upload-UUID"]
    internal = f"/_mirror/v1/uploads/{uuid}/team/orphan"
    for secret in ({}, {SECRET_HEADER: "wrong-" + SECRET}):
        status, _, body = request(a, "GET", internal, headers=secret)
        assert (status, error_code(body)) == (401, "UNAUTHORIZED")
        assert uuid.encode() not in body
    assert request(a, "GET", internal, headers={SECRET_HEADER: SECRET})[0] == 204

    a.kill9()
    status, _, body = chunk(b, location, b"z" * 100, 0)
    assert (status, error_code(body)) == (404, "BLOB_UPLOAD_UNKNOWN"), "start the upload again: a clean restart"
    assert "cannot be reached" in json.loads(body)["errors"][0]["message"]


class Hooks(ThreadingHTTPServer):
    """A webhook receiver on loopback: answers 503 while ``down``, else records the events posted."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HookHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        self.down = False
        self.attempts = 0
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()


class _HookHandler(BaseHTTPRequestHandler):
    server: Hooks

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.attempts += 1
            down = self.server.down
            if not down:
                self.server.events.extend(json.loads(body)["events"])
        self.send_response(503 if down else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def hooks_receiver() -> Iterator[Hooks]:
    hooks = Hooks()
    thread = threading.Thread(target=hooks.serve_forever, daemon=True)
    thread.start()
    try:
        yield hooks
    finally:
        hooks.shutdown()
        hooks.server_close()
        thread.join(10)


def push_image(mirror: Mirror, name: str, tag: str) -> bytes:
    """A one-layer image pushed through ``mirror`` (monolithic uploads); its manifest."""
    layer, config = os.urandom(1000), json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    for blob in (layer, config):
        status, headers, body = request(mirror, "POST", f"/v2/{name}/blobs/uploads/")
        assert status == 202, body
        status, _, body = request(mirror, "PUT", f"{headers['Location']}?digest={sha256(blob)}", blob,
                                  {"Content-Type": "application/octet-stream"})  # fmt: skip
        assert status == 201, body
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer), "size": len(layer)}],
    }).encode()  # fmt: skip
    status, _, body = request(mirror, "PUT", f"/v2/{name}/manifests/{tag}", manifest, {"Content-Type": OCI_MANIFEST})
    assert status == 201, body
    return manifest


def test_a_push_is_posted_once_by_the_replicas_even_when_the_one_it_reached_dies_before_the_webhook_answered(
    upstream: str, seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    with hooks_receiver() as hooks, ExitStack() as stack:
        hooks.down = True
        a, b = two_replicas(stack, upstream, seaweed, redis_server, tmp_path, "--notify-url", hooks.url)
        manifest = push_image(a, "team/hooked", "v1")
        wait_until(lambda: hooks.attempts >= 1, what="the first try of the webhook")  # refused: A retries it
        a.kill9()  # its lock on the queue expires; B takes the queue over and posts the event itself
        hooks.down = False
        wait_until(lambda: len(hooks.events) >= 1, within=60, what="the event posted by the other replica")
        status, _, _ = request(b, "DELETE", f"/v2/team/hooked/manifests/{sha256(manifest)}")
        assert status == 202
        wait_until(lambda: len(hooks.events) >= 2, within=30, what="the delete posted")
        pushed, deleted = hooks.events
        assert (pushed["action"], pushed["target"]["digest"], pushed["target"]["tag"]) == (
            "push",
            sha256(manifest),
            "v1",
        )
        assert (deleted["action"], deleted["target"]["digest"]) == ("delete", sha256(manifest))
