"""Which service answers a read: local (pushed) repositories are answered by ``LocalRegistry``, everything else
by the pull-through service. Both offer the same read methods (``Content``), so handlers cannot tell them apart.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from mirror.api.keys import LOCAL, PULL
from mirror.inflight import Fetch
from mirror.oci.reference import LOCAL as LOCAL_REGISTRY
from mirror.oci.reference import Digest, Repo, Tag
from mirror.pullthrough import ManifestAnswer, MemoryBlob, StoredBlob
from mirror.upstream.client import ManifestHead


class Content(Protocol):
    async def blob(self, repo: Repo, digest: Digest) -> StoredBlob | MemoryBlob | Fetch: ...

    async def blob_head(self, repo: Repo, digest: Digest) -> StoredBlob | MemoryBlob | Fetch | int: ...

    async def manifest(self, repo: Repo, ref: Tag | Digest, accepted: frozenset[str]) -> ManifestAnswer: ...

    async def manifest_head(
        self, repo: Repo, ref: Tag | Digest, accepted: frozenset[str]
    ) -> tuple[ManifestHead, bool]: ...

    async def list_tags(self, repo: Repo, n: int | None, last: str | None) -> tuple[list[str], str | None]: ...


def content_for(app: web.Application, repo: Repo) -> Content:
    return app[LOCAL] if repo.registry == LOCAL_REGISTRY else app[PULL]
