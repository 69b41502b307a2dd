"""Pushing images into an upstream registry and pulling them through the mirror over plain HTTP, as a client
does (urllib: no client library between the test and the wire)."""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.request
from typing import Any

# --- pushing images into the upstream, pulling them through the mirror (plain HTTP, like a client) --------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:

    return "sha256:" + hashlib.sha256(data).hexdigest()


def _request(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:

    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    return urllib.request.urlopen(req, timeout=60)


def exchange(
    url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request to the server at ``url`` on a connection of its own: status, headers and body, whatever the
    status (an error is an answer to look at, not an exception)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def push_blob(registry: str, repo: str, data: bytes) -> str:
    digest = sha256(data)
    with _request("POST", f"{registry}/v2/{repo}/blobs/uploads/", b"") as resp:
        location = resp.headers["Location"]
    if location.startswith("/"):
        location = registry + location
    sep = "&" if "?" in location else "?"
    headers = {"Content-Type": "application/octet-stream"}
    with _request("PUT", f"{location}{sep}digest={digest}", data, headers) as resp:
        assert resp.status == 201
    return digest


def push_random_image(
    registry: str, repo: str, tag: str | None, layers: list[bytes], arch: str = "amd64"
) -> dict[str, Any]:
    """An OCI image (config + layers of the given bytes, not tar archives) pushed to ``registry``; returns its
    digests and sizes."""

    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256(b) for b in layers]}}
    ).encode()
    descs = [{"mediaType": OCI_LAYER, "digest": push_blob(registry, repo, b), "size": len(b)} for b in layers]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": push_blob(registry, repo, config), "size": len(config)},
            "layers": descs,
        }
    ).encode()
    digest = sha256(manifest)
    with _request("PUT", f"{registry}/v2/{repo}/manifests/{tag or digest}", manifest, {"Content-Type": OCI_MANIFEST}):
        pass
    return {
        "repo": repo,
        "tag": tag,
        "manifest": digest,
        "manifest_size": len(manifest),
        "config": sha256(config),
        "config_size": len(config),
        "layers": [d["digest"] for d in descs],
        "bytes": len(manifest) + len(config) + sum(len(b) for b in layers),
    }


def push_index(registry: str, repo: str, tag: str, images: dict[str, dict[str, Any]]) -> str:
    """An OCI index over already pushed images, ``{"linux/amd64": image, ...}``."""

    entries = []
    for platform, image in images.items():
        os_name, arch = platform.split("/", 1)
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image["manifest"],
                "size": image["manifest_size"],
                "platform": {"os": os_name, "architecture": arch},
            }
        )
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    with _request("PUT", f"{registry}/v2/{repo}/manifests/{tag}", body, {"Content-Type": OCI_INDEX}):
        pass
    return sha256(body)


def pull(mirror: str, name: str, ref: str) -> dict[str, Any]:
    """Pull one platform image through the mirror as a client does (manifest, then config and layers), checking
    every digest. Returns what was received."""

    accept = ", ".join((OCI_INDEX, OCI_MANIFEST))
    with _request("GET", f"{mirror}/v2/{name}/manifests/{ref}", headers={"Accept": accept}) as resp:
        body = resp.read()
        media_type = resp.headers["Content-Type"]
    doc = json.loads(body)
    if media_type == OCI_INDEX:
        return pull(mirror, name, doc["manifests"][0]["digest"])
    blobs: dict[str, int] = {}
    for desc in [doc["config"], *doc["layers"]]:
        with _request("GET", f"{mirror}/v2/{name}/blobs/{desc['digest']}") as resp:
            data = resp.read()
        assert sha256(data) == desc["digest"], f"{desc['digest']}: wrong bytes served"
        blobs[desc["digest"]] = len(data)
    return {"manifest": sha256(body), "blobs": blobs}
