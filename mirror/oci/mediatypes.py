"""Manifest media types and ``Accept`` negotiation.

Clients send Accept values in any order (dockerd shuffles them) and as one header or several; a manifest is
chosen by digest and media type, never by the position of an Accept value.
"""

from __future__ import annotations

from collections.abc import Iterable

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES | {DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED}

# What the mirror asks its upstream for when a client sent no Accept at all: every modern type.
DEFAULT_ACCEPT = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)


def parse_accept(headers: Iterable[str]) -> frozenset[str]:
    """All media types named in one or more Accept headers, without parameters (``;q=``)."""
    types: set[str] = set()
    for header in headers:
        for item in header.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type:
                types.add(media_type)
    return frozenset(types)


def accepts(accepted: frozenset[str], media_type: str) -> bool:
    """Whether a client that sent ``accepted`` can take a manifest of ``media_type``.

    No Accept, ``*/*`` or ``application/*`` accepts anything. A client that lists only Docker schema 1 or plain
    JSON still gets what it asked for by digest, so only tag resolution consults this.
    """
    if not accepted or "*/*" in accepted or "application/*" in accepted:
        return True
    return media_type in accepted


def upstream_accept(accepted: frozenset[str]) -> str:
    """The Accept header sent upstream: the client's own list, or every modern type when it sent none."""
    types = sorted(accepted) if accepted else list(DEFAULT_ACCEPT)
    return ", ".join(types)
