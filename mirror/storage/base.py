"""The storage seam: what the services, eviction, gc, verify and the admin commands need from a store, as
``typing.Protocol``s.

``BlobStore`` and ``Index`` (local disk + diskcache) are the implementations of one node, ``S3Store`` and
``RedisIndex`` those of replicas sharing a bucket and Redis, each assigned to its protocol at the bottom of this
module so that mypy checks it. ``app.create_app`` picks them; the callers do not change. Methods named ``*_sync`` do file or
database work and are called from a thread (or a CLI process), never on the event loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from mirror.oci.reference import Digest, Repo
from mirror.storage.records import ManifestRecord, TagRecord

if TYPE_CHECKING:
    from mirror.storage.blobs import StoredFile


class StoreUnavailable(Exception):
    """The store could not be reached or refused a request (an object store's bucket): a 503, never a 200 with
    short bytes."""


class BlobWriterLike(Protocol):
    """A blob being written: hashed on the fly, invisible until ``commit`` verifies digest and size."""

    temp_path: Path
    written: int

    async def write(self, data: bytes | bytearray | memoryview) -> None: ...

    async def commit(
        self,
        expected: Digest | None = None,
        expected_size: int | None = None,
        verified: Callable[[], None] | None = None,
    ) -> Digest:
        """Check size and digest, then publish; ``verified`` is called once they matched, before publishing."""
        ...

    async def abort(self) -> None: ...

    def mark(self) -> tuple[int, hashlib._Hash]:
        """The bytes written so far and their hash state (a copy)."""
        ...


class BlobStorage(Protocol):
    """Content-addressed blobs (layers, configs, manifests), immutable once committed."""

    def path(self, digest: Digest) -> Path: ...

    def size_sync(self, digest: Digest) -> int | None: ...

    async def size(self, digest: Digest) -> int | None: ...

    async def read(self, digest: Digest) -> bytes | None: ...

    async def read_verified(self, digest: Digest) -> bytes | None: ...

    def writer(self, algorithm: str = "sha256") -> BlobWriterLike: ...

    def fetch_writer(self, registry: str, digest: Digest, resume: bool = False) -> BlobWriterLike:
        """The writer of an upstream fetch of ``digest`` from ``registry``, at a temp path named by that key;
        with ``resume``, continuing the bytes an interrupted fetch left there."""
        ...

    async def put(self, data: bytes, expected: Digest | None = None) -> Digest: ...

    @property
    def tmp_dir(self) -> Path:
        """Where the temp files of writes go, on local disk (a push upload's ``BlobWriter`` too)."""
        ...

    async def publish_file(self, temp_path: Path, digest: Digest) -> None:
        """A closed local file, verified as ``digest`` (a push upload's data), becomes the stored blob: renamed into
        place on disk; read back into the bucket, hashed again, by an object store. The file is consumed."""
        ...

    async def delete(self, digest: Digest) -> bool: ...

    # --- eviction, gc, verify, admin ----------------------------------------------------------------------
    def read_sync(self, digest: Digest) -> bytes | None: ...

    def delete_sync(self, digest: Digest) -> bool: ...

    def withdraw(self, digest: Digest) -> None:
        """On the loop: ``digest`` is absent from now on, until ``remove_withdrawn`` or a new publish."""

    async def remove_withdrawn(self, digests: Iterable[Digest]) -> list[Digest]: ...

    def walk_sync(self) -> Iterator[StoredFile]: ...

    def intact_sync(self, digest: Digest) -> bool | None: ...

    def quarantine_sync(self, location: str, label: str) -> str: ...

    def sweep_tmp_sync(self, max_age: float, dry_run: bool = False) -> int: ...

    def probe_sync(self) -> None: ...

    async def check_space(self, size: int | None) -> None: ...

    async def free_space(self) -> int: ...

    def open_growing(self, temp_path: Path, digest: Digest) -> IO[bytes]:
        """The growing temp file of a blob being written, or the published blob if it was renamed meanwhile
        (blocking: called in a thread)."""
        ...


class RemoteBlobs(Protocol):
    """A store whose content is not in local files (object storage): hits are streamed from it, or redirected."""

    def stream(self, digest: Digest, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """Bytes ``start``..``end`` (exclusive) of a stored blob; FileNotFoundError if it is not stored."""
        ...

    async def presigned_url(self, digest: Digest) -> str: ...

    def local_copy(self, digest: Digest) -> Path | None:
        """A verified copy of the blob on local disk (the local tier), to send with sendfile; None without one."""
        ...

    def warm(self, digest: Digest, size: int) -> None:
        """The blob is being read from the store: keep a local copy of it, if there is a tier (in the background)."""
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

    # --- gc, eviction, admin (in a thread) ------------------------------------------------------------------
    def get_manifest_sync(self, digest: Digest) -> ManifestRecord | None: ...

    def delete_manifest_sync(self, digest: Digest) -> None: ...

    def iter_manifests_sync(self) -> Iterator[tuple[Digest, ManifestRecord]]: ...

    def get_tag_sync(self, registry: str, path: str, tag: str) -> TagRecord | None: ...

    def iter_tags_sync(self) -> Iterator[tuple[str, str, str, TagRecord]]: ...

    def delete_tag_sync(self, registry: str, path: str, tag: str) -> None: ...

    def pushed_digests_sync(self) -> set[str]: ...

    # --- the web page's listing (in a thread) ----------------------------------------------------------------
    def repositories_sync(self, search: str = "", after: str = "", limit: int = 50) -> list[Repo]: ...

    def repository_known_sync(self, repo: Repo) -> bool: ...

    def list_tags_sync(self, repo: Repo) -> tuple[str, ...]: ...

    def pushed_in_sync(self, digest: Digest) -> frozenset[str]: ...

    def referrers_sync(self, name: str, subject: Digest) -> tuple[dict[str, Any], ...]: ...

    def may_serve_sync(self, digest: Digest, registry: str) -> bool: ...


class RegistryIndex(MetadataIndex, Protocol):
    """Everything an index offers: the ``MetadataIndex`` plus the records of local (pushed) repositories (names,
    links, referrers) and its lifecycle, for the local registry and the composition root. ``Index`` on the data
    dir; ``RedisIndex`` shared by the replicas of a cluster."""

    async def pulled(self, repo: Repo) -> bool: ...

    def local_repos_sync(self) -> tuple[str, ...]: ...

    async def add_local_repo(self, name: str) -> None: ...

    async def link(self, name: str, digest: Digest) -> None: ...

    async def unlink(self, name: str, digest: Digest) -> bool: ...

    async def linked(self, name: str, digest: Digest) -> bool: ...

    def is_pushed_sync(self, digest: Digest) -> bool: ...

    async def add_referrer(self, name: str, subject: Digest, descriptor: dict[str, Any]) -> None: ...

    async def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None: ...

    async def referrers(self, name: str, subject: Digest) -> tuple[dict[str, Any], ...]: ...

    def healthy_sync(self) -> bool:
        """The index answers a read (for /readyz); raises otherwise."""
        ...

    def close(self) -> None: ...


class UsageRecorder(Protocol):
    """What the services tell the usage table (``storage.usage``): hits refresh recency, commits add content,
    fetches under way announce their size so eviction makes room ahead of them."""

    def touch(self, digest: Digest) -> None: ...

    def may_hold(self, digest: Digest) -> bool:
        """False only when the table is sure the store holds no ``digest`` (so a miss need not ask the store)."""
        ...

    def expect(self, size: int | None) -> None: ...

    async def added(self, digest: Digest, size: int, kind: str, repo: str = "", local: bool = False) -> None: ...


class NullUsage:
    """The ``UsageRecorder`` of a PullThrough built without a usage table (tests of other concerns): every call is a
    no-op."""

    def touch(self, digest: Digest) -> None:
        pass

    def may_hold(self, digest: Digest) -> bool:
        return True

    def expect(self, size: int | None) -> None:
        pass

    async def added(self, digest: Digest, size: int, kind: str, repo: str = "", local: bool = False) -> None:
        pass


if TYPE_CHECKING:  # each implementation assigned to its protocol once, so mypy checks it (never run)
    from mirror.storage.blobs import BlobStore
    from mirror.storage.index import Index
    from mirror.storage.redisindex import RedisIndex
    from mirror.storage.s3 import S3Store
    from mirror.storage.s3writer import S3Writer
    from mirror.storage.usage import Usage
    from mirror.storage.writer import BlobWriter

    def _implementations(
        store: BlobStore, writer: BlobWriter, index: Index, usage: Usage, null: NullUsage
    ) -> tuple[BlobStorage, BlobWriterLike, RegistryIndex, UsageRecorder, UsageRecorder]:
        return store, writer, index, usage, null

    def _shared_index(index: RedisIndex) -> RegistryIndex:
        return index

    def _object_storage(store: S3Store, writer: S3Writer) -> tuple[BlobStorage, BlobWriterLike, RemoteBlobs]:
        return store, writer, store
