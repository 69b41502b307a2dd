"""Random, incompressible content pushed to the upstream through the registry API. Big blobs are generated and
streamed in 1 MiB pieces (a chunked upload: POST, one streamed PATCH hashed on the way, PUT with the digest), so a
4 GiB blob never sits in memory."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.ops import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, _request, push_blob, sha256

PIECE = 1 << 20


def _absolute(registry: str, location: str) -> str:
    return registry + location if location.startswith("/") else location


def push_random_blob(registry: str, repo: str, size: int) -> str:
    """A blob of ``size`` random bytes, streamed to ``registry``; its digest."""
    with _request("POST", f"{registry}/v2/{repo}/blobs/uploads/", b"") as resp:
        location = _absolute(registry, resp.headers["Location"])
    hasher = hashlib.sha256()

    def pieces() -> Iterator[bytes]:
        left = size
        while left > 0:
            piece = os.urandom(min(PIECE, left))
            hasher.update(piece)
            left -= len(piece)
            yield piece

    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    with _request("PATCH", location, pieces(), headers) as resp:  # type: ignore[arg-type]
        location = _absolute(registry, resp.headers["Location"])
    digest = "sha256:" + hasher.hexdigest()
    sep = "&" if "?" in location else "?"
    with _request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", b"") as resp:
        assert resp.status == 201, resp.status
    return digest


@dataclass
class PushedImage:
    repo: str
    tag: str
    index: str  # digest of the multi-arch index
    manifests: dict[str, str]  # arch -> manifest digest
    layer_bytes: int  # bytes of config + layers of one platform


def push_multiarch(
    registry: str, repo: str, tag: str, layers: int, layer_size: int, arches: tuple[str, ...]
) -> PushedImage:
    """An OCI index over one image per arch, each with ``layers`` random layers: ``layer_size`` bytes for the
    first arch (the one clients here pull), 4 KiB for the others (listed, never pulled)."""
    entries, manifests, per_platform = [], {}, 0
    for number, arch in enumerate(arches):
        size = layer_size if number == 0 else 4096
        descs = []
        for _ in range(layers):
            descs.append({"mediaType": OCI_LAYER, "digest": push_random_blob(registry, repo, size), "size": size})
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
            }
        ).encode()
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": push_blob(registry, repo, config), "size": len(config)},
                "layers": descs,
            }
        ).encode()
        digest = sha256(body)
        with _request("PUT", f"{registry}/v2/{repo}/manifests/{digest}", body, {"Content-Type": OCI_MANIFEST}):
            pass
        manifests[arch] = digest
        per_platform = per_platform or len(config) + layers * size
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(body),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    with _request("PUT", f"{registry}/v2/{repo}/manifests/{tag}", index, {"Content-Type": OCI_INDEX}):
        pass
    return PushedImage(repo, tag, sha256(index), manifests, per_platform)
