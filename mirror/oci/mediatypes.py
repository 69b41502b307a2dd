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


WILDCARDS = frozenset({"*/*", "application/*"})


def accepts_any(accepted: frozenset[str]) -> bool:
    """No Accept, ``*/*`` or ``application/*``: the client takes every manifest type."""
    return not accepted or not WILDCARDS.isdisjoint(accepted)


def accepts(accepted: frozenset[str], media_type: str) -> bool:
    """Whether a client that sent ``accepted`` can take a manifest of ``media_type``.

    No Accept, ``*/*`` or ``application/*`` accepts anything. A client that lists only Docker schema 1 or plain
    JSON still gets what it asked for by digest, so only tag resolution consults this.
    """
    return accepts_any(accepted) or media_type in accepted


def upstream_types(accepted: frozenset[str]) -> list[str]:
    """The media types asked of the upstream: the client's own, plus every modern type when it takes any type.
    Wildcards are never sent as such: Distribution serves an OCI manifest or index only to an Accept naming its
    type (``*/*`` is not enough), so a cold ``*/*`` would be a 404 where a cached one is a 200."""
    named = sorted(accepted - WILDCARDS)
    if not accepts_any(accepted):
        return named
    return [*DEFAULT_ACCEPT, *(t for t in named if t not in DEFAULT_ACCEPT)]


def upstream_accept(accepted: frozenset[str]) -> str:
    """The Accept header sent upstream (``upstream_types``)."""
    return ", ".join(upstream_types(accepted))


def names_every_type(accepted: frozenset[str]) -> bool:
    """Whether an upstream asked with ``accepted`` could answer with any modern manifest type: only then does its
    404 mean the tag is gone, rather than that no manifest of the types asked for exists."""
    return set(DEFAULT_ACCEPT) <= set(upstream_types(accepted))
