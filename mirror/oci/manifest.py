"""Manifest and index parsing: media type, children, config, layers, subject.

Only what the mirror needs to reason about a manifest; the bytes themselves are always stored and served exactly
as received, because their digest is what clients verify.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mirror.oci.errors import ManifestInvalid
from mirror.oci.mediatypes import (
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from mirror.oci.reference import Digest

MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: str | None = None
    artifact_type: str | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    children: tuple[Descriptor, ...]
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict[str, str]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def _descriptor(raw: Any) -> Descriptor:
    if not isinstance(raw, dict):
        raise ManifestInvalid("descriptor is not an object")
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid("descriptor has no valid size", detail={"descriptor": raw})
    digest = raw.get("digest")
    if not isinstance(digest, str):
        raise ManifestInvalid("descriptor has no digest", detail={"descriptor": raw})
    platform = raw.get("platform")
    platform_text = None
    if isinstance(platform, dict):
        platform_text = "/".join(
            str(platform[k]) for k in ("os", "architecture", "variant") if isinstance(platform.get(k), str)
        )
    return Descriptor(
        media_type=str(raw.get("mediaType", "")),
        digest=Digest.parse(digest),
        size=size,
        platform=platform_text,
        artifact_type=raw.get("artifactType") if isinstance(raw.get("artifactType"), str) else None,
    )


def sniff_media_type(data: bytes) -> str | None:
    """The ``mediaType`` field of a manifest, for upstreams that answer with a generic Content-Type."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    media_type = doc.get("mediaType")
    if isinstance(media_type, str):
        return media_type
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in doc else DOCKER_SCHEMA1
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    return None


def parse_manifest(data: bytes, media_type: str) -> Manifest:
    """Parse and check the structure of a manifest of the given media type; raise ManifestInvalid otherwise."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")
    declared = doc.get("mediaType")
    if declared is not None and declared != media_type:
        raise ManifestInvalid(f"mediaType {declared!r} does not match Content-Type {media_type!r}")
    if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        layers = tuple(
            Descriptor("", Digest.parse(str(item.get("blobSum", ""))), -1)
            for item in doc.get("fsLayers", [])
            if isinstance(item, dict)
        )
        return Manifest(media_type, None, layers, (), None, None, {})
    children: tuple[Descriptor, ...] = ()
    layers = ()
    config = None
    if media_type in INDEX_TYPES:
        raw_children = doc.get("manifests")
        if not isinstance(raw_children, list):
            raise ManifestInvalid("index has no manifests list")
        children = tuple(_descriptor(item) for item in raw_children)
    else:
        config = _descriptor(doc.get("config"))
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise ManifestInvalid("manifest has no layers list")
        layers = tuple(_descriptor(item) for item in raw_layers)
    subject = _descriptor(doc["subject"]) if doc.get("subject") is not None else None
    annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else {}
    artifact_type = doc.get("artifactType") if isinstance(doc.get("artifactType"), str) else None
    return Manifest(media_type, config, layers, children, subject, artifact_type, dict(annotations or {}))
