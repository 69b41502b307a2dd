"""Helpers for the push tests: content that hashes to known digests, the push calls a client makes (against an
in-process mirror, ``aiohttp_client(create_app(...))``), and what the tests with real clients need besides the
launchers of ``tests.support.ops``: images built in Python as OCI layouts, certificates, htpasswd files, a webhook
receiver."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import ssl
import tarfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from mirror.config import Config, UpstreamConfig
from tests.support.clients import run
from tests.support.ops import require
from tests.support.plain_http import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, sha256

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"

PushMirror = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def image_config(arch: str = "amd64") -> bytes:
    return json.dumps({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()


def image_manifest(
    config: bytes,
    layers: list[bytes],
    subject: tuple[str, int, str] | None = None,
    artifact_type: str | None = None,
    config_type: str = OCI_CONFIG,
    annotations: dict[str, str] | None = None,
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(b), "size": len(b)} for b in layers],
    }
    if artifact_type:
        doc["artifactType"] = artifact_type
    if subject is not None:
        media_type, size, digest = subject
        doc["subject"] = {"mediaType": media_type, "size": size, "digest": digest}
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc).encode()


def image_index(children: list[tuple[bytes, str]]) -> bytes:
    """An OCI index over ``[(manifest bytes, arch)]``."""
    manifests = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sha256(body),
            "size": len(body),
            "platform": {"architecture": arch, "os": "linux"},
        }
        for body, arch in children
    ]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


async def push_blob(client: TestClient[web.Request, web.Application], repo: str, data: bytes, **kwargs: Any) -> str:
    """Monolithic upload; returns the digest."""
    digest = sha256(data)
    resp = await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", data=data, **kwargs)
    assert resp.status == 201, await resp.text()
    return digest


async def push_manifest(
    client: TestClient[web.Request, web.Application],
    repo: str,
    ref: str,
    body: bytes,
    media_type: str = OCI_MANIFEST,
    headers: dict[str, str] | None = None,
) -> str:
    resp = await client.put(
        f"/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media_type, **(headers or {})}
    )
    assert resp.status == 201, await resp.text()
    return resp.headers["Docker-Content-Digest"]


async def push_image(
    client: TestClient[web.Request, web.Application],
    repo: str,
    tag: str,
    layers: list[bytes],
    arch: str = "amd64",
    headers: dict[str, str] | None = None,
) -> bytes:
    """Config and layers, then the manifest under ``tag``; returns the manifest bytes."""
    config = image_config(arch)
    for blob in (config, *layers):
        await push_blob(client, repo, blob, headers=headers)
    manifest = image_manifest(config, layers)
    await push_manifest(client, repo, tag, manifest, headers=headers)
    return manifest


async def error_code(resp: ClientResponse) -> str | None:
    """The OCI error code of an error answer (``None`` for a HEAD, which has no body)."""
    if resp.method == "HEAD":
        return None
    body = await resp.json(content_type=None)
    return str(body["errors"][0]["code"])


def mirror_config(data_dir: Path, upstream_url: str, **settings: Any) -> Config:
    return Config(
        data_dir=data_dir,
        upstreams=(UpstreamConfig(registry="docker.io", url=upstream_url, default=True, timeout=2.0),),
        **settings,
    )


# --- images ------------------------------------------------------------------------------------------------------
def _put(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _image(layout: Path, arch: str, text: str) -> dict[str, object]:
    """One single-layer image (a file ``/hello.txt``) in the layout; its manifest descriptor."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        content = text.encode() + os.urandom(64 * 1024)  # distinct layers per test run
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime = len(content), 0
        tar.addfile(info, io.BytesIO(content))
    raw = buf.getvalue()
    layer, layer_size = _put(layout, gzip.compress(raw, mtime=0))
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }
    config_digest, config_size = _put(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}],
    }  # fmt: skip
    digest, size = _put(layout, json.dumps(manifest).encode())
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": size,
        "platform": {"architecture": arch, "os": "linux"},
    }


def oci_layout(layout: Path, tag: str, arches: tuple[str, ...] = ("amd64",)) -> str:
    """An OCI image layout holding one image (one arch) or an index (several) under ``tag``; its digest."""
    descriptors = [_image(layout, arch, f"hello from {arch} {tag}\n") for arch in arches]
    if len(descriptors) == 1:
        top = descriptors[0]
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        digest, size = _put(layout, json.dumps(index).encode())
        top = {"mediaType": OCI_INDEX, "digest": digest, "size": size}
    entry = {**top, "annotations": {"org.opencontainers.image.ref.name": tag}}
    entry.pop("platform", None)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return str(top["digest"])


def docker_archive(directory: Path, name: str) -> Path:
    """A ``docker load``-able tarball of a fresh single-arch image called ``name``."""
    layout = directory / "layout"
    oci_layout(layout, "1.0")
    archive = directory / "image.tar"
    run(require("skopeo"), "copy", f"oci:{layout}:1.0", f"docker-archive:{archive}:{name}")
    return archive


def self_signed(directory: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) naming only ``ip`` in its subjectAltName: a client that verifies
    it reached exactly that address."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    run(require("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
        "-out", str(cert), "-subj", f"/CN={ip}", "-addext", f"subjectAltName=IP:{ip}")  # fmt: skip
    return cert, key


def htpasswd_file(path: Path, user: str, password: str) -> Path:
    run(require("htpasswd"), "-cbBC", "5", str(path), user, password)
    return path


# --- reading from a mirror process, receiving its webhooks ------------------------------------------------------
def get_json(url: str, headers: dict[str, str] | None = None, ca: Path | None = None) -> Any:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30, context=context) as resp:
        return json.loads(resp.read())


def manifest_digest(
    base: str, repo: str, ref: str, headers: dict[str, str] | None = None, ca: Path | None = None
) -> str:
    accept = ", ".join([OCI_MANIFEST, OCI_INDEX, "application/vnd.docker.distribution.manifest.v2+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json"])  # fmt: skip
    request = urllib.request.Request(
        f"{base}/v2/{repo}/manifests/{ref}", method="HEAD", headers={"Accept": accept, **(headers or {})}
    )
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    with urllib.request.urlopen(request, timeout=30, context=context) as resp:
        return str(resp.headers["Docker-Content-Digest"])


class WebhookReceiver:
    """A webhook endpoint in a thread (the tests here are synchronous): collects the events posted to it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.events.extend(json.loads(body)["events"])
                receiver.arrived.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            assert self.arrived.wait(max(0.0, deadline - time.monotonic())), f"only {len(self.events)} events"
            self.arrived.clear()
        return self.events
