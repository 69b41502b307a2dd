"""Names, tags and digests: parsed once at the router into frozen value types.

Grammar from the OCI distribution spec ("Pulling manifests"), written once below: a repository name is
``_COMPONENT``s joined by ``/`` (``_NAME_RE``), a tag matches ``_TAG_RE``. Digests follow the image spec's
``algorithm:encoded`` form; we accept only the registered algorithms sha256 and sha512, with lowercase hex of
exactly their length. Because every accepted string is lowercase alphanumerics with single separators, no name,
tag or digest can contain ``..``, ``/`` at either end, or anything else that could escape the data directory when
used in a path.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mirror.oci.errors import DigestInvalid, ManifestInvalid, ManifestUnknown, NameInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")
# A registry host as clients write it: a DNS name or IP with an optional port, or localhost.
_HOST_RE = re.compile(r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?")
MAX_NAME_LENGTH = 255

DOCKER_HUB = "docker.io"
# The registry name of pushed content: ``Repo(LOCAL, "my/app")`` is the local repository ``my/app``. Not a host
# name (no dot, no port), so no upstream can be configured under it and its cache keys never collide.
LOCAL = "local"
# Names clients use for Docker Hub besides ``docker.io``; all route to the same upstream.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, hexpart = text.partition(":")
        expected = _HEX_LENGTHS.get(algorithm)
        if not sep or expected is None:
            raise DigestInvalid(f"unsupported digest algorithm in {text[:80]!r}", detail={"digest": text[:200]})
        if len(hexpart) != expected or not _HEX_RE.fullmatch(hexpart):
            raise DigestInvalid(f"malformed {algorithm} digest {text[:80]!r}", detail={"digest": text[:200]})
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True, slots=True)
class Tag:
    name: str

    @classmethod
    def parse(cls, text: str) -> Tag:
        if not _TAG_RE.fullmatch(text):
            raise ManifestInvalid(f"invalid tag {text[:140]!r}", detail={"tag": text[:200]})
        return cls(text)

    def __str__(self) -> str:
        return self.name


Reference = Tag | Digest


def parse_reference(text: str) -> Reference:
    """A manifest reference is a digest when it contains ``:`` (tags cannot), else a tag."""
    return Digest.parse(text) if ":" in text else Tag.parse(text)


def lookup_reference(text: str) -> Reference:
    """A reference to read or delete. A malformed tag cannot name anything stored, so it is unknown (404
    MANIFEST_UNKNOWN, as the distribution-spec conformance suite expects of ``.INVALID_MANIFEST_NAME``), not a bad
    request; only a write (``parse_reference``) refuses it as invalid. A malformed digest stays DIGEST_INVALID."""
    if ":" in text:
        return Digest.parse(text)
    try:
        return Tag.parse(text)
    except ManifestInvalid:
        raise ManifestUnknown(
            f"manifest {text[:140]!r} is unknown: not a valid tag", detail={"tag": text[:200]}
        ) from None


@dataclass(frozen=True, slots=True)
class Repo:
    """A repository on one upstream. ``registry`` is the host clients name (``docker.io``), so cache keys of
    ``docker.io/library/alpine`` and ``ghcr.io/library/alpine`` never collide."""

    registry: str
    path: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.path}"


def validate_name(path: str) -> str:
    if len(path) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(path):
        raise NameInvalid(f"invalid repository name {path[:140]!r}", detail={"name": path[:300]})
    return path


def docker_hub_path(path: str) -> str:
    """The ``library/`` rule: Docker Hub's official images live under ``library/``, and clients may omit it."""
    return path if "/" in path else f"library/{path}"


def canonical_registry(host: str) -> str:
    return DOCKER_HUB if host.lower() in DOCKER_HUB_ALIASES else host.lower()


def looks_like_host(component: str) -> bool:
    """The rule clients use to tell a registry host from a repository's first component (Docker's
    ``splitReposSearchTerm``): it has a dot or a port, or is ``localhost``."""
    return ("." in component or ":" in component or component == "localhost") and bool(_HOST_RE.fullmatch(component))


def parse_image_ref(text: str) -> tuple[str, str | None, str | None]:
    """``name[:tag][@digest]`` -> (name, tag, digest) as text, nothing validated; a part that is absent is None
    (``alpine@`` has the digest ``""``). The tag is a ``:`` after the last ``/``, so ``host:5000/app`` has none.
    Both readings of an image reference use it: ``routing.image`` (what an operator types) and
    ``storage.gc`` (pins, stored as ``format_image_ref`` writes them)."""
    name, at, digest = text.partition("@")
    tag: str | None = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest if at else None


def format_image_ref(repo: Repo, ref: Tag | Digest) -> str:
    """The normalized image reference: ``docker.io/library/alpine:3.19`` or ``ghcr.io/o/a@sha256:...``."""
    return f"{repo}@{ref}" if isinstance(ref, Digest) else f"{repo}:{ref}"
