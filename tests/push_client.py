"""Helpers for the push tests: content that hashes to known digests, and the push calls a client makes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from mirror.config import Config, UpstreamConfig

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"

PushMirror = Callable[..., Awaitable[TestClient]]
ROOT = Path(__file__).resolve().parent.parent


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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


async def push_blob(client: TestClient, repo: str, data: bytes, **kwargs: Any) -> str:
    """Monolithic upload; returns the digest."""
    digest = sha256(data)
    resp = await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", data=data, **kwargs)
    assert resp.status == 201, await resp.text()
    return digest


async def push_manifest(
    client: TestClient,
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
    client: TestClient,
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


async def error_code(resp: Any) -> str | None:
    if resp.method == "HEAD":
        return None
    body = await resp.json(content_type=None)
    return body["errors"][0]["code"]


def mirror_config(data_dir: Path, upstream_url: str, **settings: Any) -> Config:
    return Config(
        data_dir=data_dir,
        upstreams=(UpstreamConfig(registry="docker.io", url=upstream_url, default=True, timeout=2.0),),
        **settings,
    )


@contextlib.asynccontextmanager
async def mirror_process(
    args: list[str], ready_url: str, context: ssl.SSLContext | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The real ``mirror serve`` as a subprocess, once ``ready_url`` answers 200 (polled, with a deadline);
    terminated (if still running) on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "serve", *args,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                if proc.returncode is not None:
                    stderr = await proc.stderr.read() if proc.stderr else b""
                    raise AssertionError(f"mirror exited: {stderr.decode()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(ready_url, ssl=context if context is not None else False) as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.05)  # polling a starting process, within the deadline
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
