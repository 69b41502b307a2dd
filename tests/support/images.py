"""Real images for the pull tests, built in Python and pushed to a registry through its API: tar+gzip layers with
files in them (so clients that unpack can be checked), configs with matching ``diff_ids``, Docker schema 2 and OCI
manifests, a Docker manifest list and an OCI index."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

from tests.support.plain_http import OCI_INDEX, OCI_MANIFEST, _request, push_blob, sha256

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ALL_MANIFESTS = ", ".join((DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX))


def tar_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip-compressed tar holding ``files``; the compressed bytes and the diff ID (digest of the tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0, compresslevel=1), sha256(raw)


@dataclass
class Image:
    """One platform image as pushed: what a client must end up with."""

    repo: str
    manifest: str  # digest
    manifest_size: int
    media_type: str
    config: str
    layers: list[str]
    files: dict[str, bytes]  # path in the image -> content (the last layer wins)
    arch: str = "amd64"
    sizes: dict[str, int] = field(default_factory=dict)  # digest -> size, config and layers

    @property
    def blobs(self) -> list[str]:
        return [self.config, *self.layers]


def push_tar_image(
    registry: str,
    repo: str,
    tag: str | None,
    layers: list[dict[str, bytes]],
    arch: str = "amd64",
    docker: bool = False,
) -> Image:
    """Push an image whose layers hold ``layers`` (one dict of files per layer) as a Docker schema 2 (``docker``)
    or OCI manifest; tagged ``tag`` when given."""
    blobs = [tar_layer(files) for files in layers]
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in blobs]},
        }
    ).encode()
    layer_type, config_type, manifest_type = (
        (DOCKER_LAYER, DOCKER_CONFIG, DOCKER_MANIFEST) if docker else (OCI_LAYER, OCI_CONFIG, OCI_MANIFEST)
    )
    layer_digests = [push_blob(registry, repo, gz) for gz, _ in blobs]
    config_digest = push_blob(registry, repo, config)
    sizes = {config_digest: len(config)} | {d: len(gz) for d, (gz, _) in zip(layer_digests, blobs, strict=True)}
    descs = [{"mediaType": layer_type, "digest": d, "size": sizes[d]} for d in layer_digests]
    config_desc = {"mediaType": config_type, "digest": config_digest, "size": len(config)}
    body = json.dumps({"schemaVersion": 2, "mediaType": manifest_type, "config": config_desc, "layers": descs}).encode()
    digest = sha256(body)
    with _request("PUT", f"{registry}/v2/{repo}/manifests/{tag or digest}", body, {"Content-Type": manifest_type}):
        pass
    files: dict[str, bytes] = {}
    for layer in layers:
        files.update(layer)
    return Image(repo, digest, len(body), manifest_type, config_digest, layer_digests, files, arch, sizes)


def push_list(registry: str, repo: str, tag: str, images: list[Image], docker: bool = False) -> str:
    """A Docker manifest list (``docker``) or an OCI index over pushed images, tagged ``tag``; its digest."""
    media_type = DOCKER_LIST if docker else OCI_INDEX
    entries = [
        {
            "mediaType": image.media_type,
            "digest": image.manifest,
            "size": image.manifest_size,
            "platform": {"os": "linux", "architecture": image.arch},
        }
        for image in images
    ]
    body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()
    with _request("PUT", f"{registry}/v2/{repo}/manifests/{tag}", body, {"Content-Type": media_type}):
        pass
    return sha256(body)


def manifest_digest(base: str, repo: str, ref: str) -> str:
    """The digest a registry answers for ``repo:ref`` (HEAD, every manifest type accepted)."""
    with _request("HEAD", f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": ALL_MANIFESTS}) as resp:
        return str(resp.headers["Docker-Content-Digest"])


def random_files(name: str, size: int) -> dict[str, bytes]:
    """One file of incompressible bytes (distinct per run, so every test run starts cold)."""
    return {name: os.urandom(size)}
