"""The storage seam: what the pull-through (and push) services need from a store, as ``typing.Protocol``s.

``BlobStore`` and ``Index`` (local disk + diskcache) are the implementations today. Another backend (object
storage, say) implements these two protocols and is chosen in ``app.create_app``; nothing in ``api/`` changes,
except that a backend whose blobs are not local files answers ``local_path`` with None and is streamed instead of
sent with sendfile.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Protocol

from mirror.oci.reference import Digest, Repo
from mirror.storage.index import ManifestRecord, TagRecord


class BlobWriterLike(Protocol):
    """A blob being written: hashed on the fly, invisible until ``commit`` verifies digest and size."""

    temp_path: Path
    written: int

    async def write(self, data: bytes | bytearray | memoryview) -> None: ...

    async def commit(self, expected: Digest | None = None, expected_size: int | None = None) -> Digest: ...

    async def abort(self) -> None: ...


class BlobStorage(Protocol):
    """Content-addressed blobs (layers, configs, manifests), immutable once committed."""

    def path(self, digest: Digest) -> Path: ...

    def size_sync(self, digest: Digest) -> int | None: ...

    async def size(self, digest: Digest) -> int | None: ...

    async def read(self, digest: Digest) -> bytes | None: ...

    async def read_verified(self, digest: Digest) -> bytes | None: ...

    def writer(self, algorithm: str = "sha256") -> BlobWriterLike: ...

    async def put(self, data: bytes, expected: Digest | None = None) -> Digest: ...

    async def delete(self, digest: Digest) -> bool: ...

    async def check_space(self, size: int | None) -> None: ...

    async def free_space(self) -> int: ...

    def open_growing(self, temp_path: Path, digest: Digest) -> IO[bytes]:
        """The growing temp file of a blob being written, or the published blob if it was renamed meanwhile
        (blocking: called in a thread)."""
        ...


class MetadataIndex(Protocol):
    """What is known about stored content besides its bytes: manifest media types, tag -> digest records."""

    async def get_manifest(self, digest: Digest) -> ManifestRecord | None: ...

    async def put_manifest(self, digest: Digest, record: ManifestRecord) -> None: ...

    async def delete_manifest(self, digest: Digest) -> None: ...

    async def get_tag(self, repo: Repo, tag: str) -> TagRecord | None: ...

    async def put_tag(self, repo: Repo, tag: str, record: TagRecord) -> None: ...

    async def delete_tag(self, repo: Repo, tag: str) -> None: ...

    async def list_tags(self, repo: Repo) -> tuple[str, ...]: ...

    async def mark_pulled(self, repo: Repo) -> None: ...

    async def may_serve(self, digest: Digest, registry: str) -> bool: ...

    async def add_origin(self, digest: Digest, registry: str) -> None: ...


class UsageRecorder(Protocol):
    """What the services tell the usage table (``storage.usage``): hits refresh recency, commits add content,
    fetches under way announce their size so eviction makes room ahead of them."""

    def touch(self, digest: Digest) -> None: ...

    def expect(self, size: int | None) -> None: ...

    async def added(self, digest: Digest, size: int, kind: str, repo: str = "", local: bool = False) -> None: ...
