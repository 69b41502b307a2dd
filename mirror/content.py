"""What a read of stored or pulled-through content answers, and the one read interface (``Content``) that both
the pull-through service (``pull.service.PullThrough``) and the local registry (``push``) offer, so the HTTP
handlers cannot tell them apart (as Distribution's proxy stores wrap the local ones behind the same interface).

A blob read answers one of: ``StoredBlob`` (a file in the store, sent with sendfile), ``MemoryBlob`` (a small blob
from memory), a fetch under way (``pull.inflight.FetchState``: a miss the client streams while it arrives), or
for a HEAD of a blob not held, the size the upstream announces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirror.oci.reference import Digest, Repo, Tag
from mirror.pull.inflight import FetchState
from mirror.upstream.client import ManifestHead


@dataclass(frozen=True, slots=True)
class StoredBlob:
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class MemoryBlob:
    """A small blob answered from memory (verified against its digest when it was read from disk)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    digest: Digest
    media_type: str
    data: bytes
    stale: bool = False


BlobAnswer = StoredBlob | MemoryBlob | FetchState
BlobHeadAnswer = StoredBlob | MemoryBlob | FetchState | int  # int: the size the upstream announces


class Content(Protocol):
    async def blob(self, repo: Repo, digest: Digest) -> BlobAnswer: ...

    async def blob_head(self, repo: Repo, digest: Digest) -> BlobHeadAnswer: ...

    async def manifest(self, repo: Repo, ref: Tag | Digest, accepted: frozenset[str]) -> ManifestAnswer: ...

    async def manifest_head(
        self, repo: Repo, ref: Tag | Digest, accepted: frozenset[str]
    ) -> tuple[ManifestHead, bool]: ...

    async def list_tags(self, repo: Repo, n: int | None, last: str | None) -> tuple[list[str], str | None]: ...
