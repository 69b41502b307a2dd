"""Content-addressed blob files: the only module that touches content files (write, publish, read, delete,
withdraw for eviction, quarantine, walk, temp sweeps). Eviction, gc, verify and the admin commands reach content
only through ``BlobStore``'s methods, so another implementation of ``base.BlobStorage`` can replace it.

Layout of the data dir::

    <data-dir>/
      blobs/
        sha256/
          ab/
            ab12...ef          one file per digest: layers, configs and manifests alike, bytes exactly as
                               received; visible only once complete, verified and fsynced
        sha512/...
      tmp/
        fetch-<random>         manifests being stored; start-up removes whatever is here
        fetch-<alg>-<hex>-<r>  an upstream fetch of that digest from upstream <r> (a hash of its name), named by
                               its key so that other processes sharing the data dir find it (fetchlocks.py)
        lock-<alg>-<hex>-<r>   that fetch's lock file (fetchlocks.py), removed by its holder
        lock-ref-<hash>        the lock of upstream requests about one tag or manifest (reflocks.py), likewise
      index/                   diskcache: tags, manifest media types (see index.py)
      usage/                   diskcache: size, kind, last served of every digest; pins (see usage.py)
      quarantine/              files that failed verification or did not belong in blobs/ (``quarantine_sync``,
                               called by gc.py); nothing reads them
      uploads/
        <uuid>/                one push upload session (see sessions.py): session.json + data, the bytes
                               received so far; ``commit`` renames ``data`` into ``blobs/``

A writer hashes every byte as it passes, writes to a temp file under ``tmp/`` (same filesystem as ``blobs/``),
and on ``commit`` checks size and digest, fsyncs, and ``os.replace``s the file into place. Nothing is visible at
the final path before that, so a crash leaves only a temp file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mirror.oci.reference import Digest
from mirror.storage.writer import BlobWriter, DiskFull

LOCK_PREFIX = "lock-"  # lock files of fetches in tmp/ (fetchlocks.py)
HASH_CHUNK = 1 << 20  # bytes per read when re-hashing a stored file (``intact_sync``)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One entry under ``blobs/`` as ``BlobStore.walk_sync`` finds it."""

    key: str  # the digest it is stored under ("sha256:ab12..."); "" when its name or place is not a digest's
    location: str  # where it is, relative to ``blobs/`` ("sha256/ab/ab12..."): what ``quarantine_sync`` takes
    size: int | None = None  # None: not looked at (a stray entry where a directory belongs)
    mtime: float = 0.0

    @property
    def name(self) -> str:
        return self.location.rpartition("/")[2]


class BlobStore:
    """Content-addressed files under ``<data-dir>/blobs``. See the module docstring for the layout.

    Eviction removes a file in two steps (``withdraw`` on the event loop, ``remove_withdrawn`` in a thread); a
    withdrawn digest is absent to ``size``/``read`` at once, and a publish of it cancels its removal.
    """

    def __init__(self, data_dir: Path):
        self.root = data_dir / "blobs"
        self.tmp_dir = data_dir / "tmp"
        self.quarantine_dir = data_dir / "quarantine"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._withdrawn: set[Digest] = set()  # added on the loop, discarded by threads holding _publishing
        self._publishing = threading.Lock()  # a publish and a withdrawn removal of one digest never interleave

    def path(self, digest: Digest) -> Path:
        # Digest.parse admits only [a-f0-9] of a fixed length, so this cannot leave ``root``.
        return self.root / digest.algorithm / digest.hex[:2] / digest.hex

    def size_sync(self, digest: Digest) -> int | None:
        if digest in self._withdrawn:
            return None  # being evicted: a miss, fetched again (and the new publish cancels the removal)
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    async def size(self, digest: Digest) -> int | None:
        return await asyncio.to_thread(self.size_sync, digest)

    def read_sync(self, digest: Digest) -> bytes | None:
        """Whole content of a small blob (manifests; layers are streamed), None if it is not stored."""
        if digest in self._withdrawn:
            return None
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    async def read(self, digest: Digest) -> bytes | None:
        """Whole content of a small blob (manifests only; layers are streamed with sendfile)."""
        return await asyncio.to_thread(self.read_sync, digest)

    async def read_verified(self, digest: Digest) -> bytes | None:
        """Whole content of a small blob, checked against its digest (None if missing or damaged on disk), for
        the in-memory cache of small blobs: what is kept in memory was verified when it was read."""

        def _read() -> bytes | None:
            data = self.read_sync(digest)
            if data is None:
                return None
            if hashlib.new(digest.algorithm, data).hexdigest() != digest.hex:
                log.error("blob %s on disk does not match its digest; run `mirror verify`", digest)
                return None
            return data

        return await asyncio.to_thread(_read)

    def writer(self, algorithm: str = "sha256") -> BlobWriter:
        return BlobWriter(self, algorithm)

    def fetch_key(self, registry: str, digest: Digest) -> str:
        """The name of the fetch of ``digest`` from ``registry`` in ``tmp/``, the same in every process."""
        upstream = hashlib.sha256(registry.encode()).hexdigest()[:16]
        return f"{digest.algorithm}-{digest.hex}-{upstream}"

    def fetch_temp_path(self, registry: str, digest: Digest) -> Path:
        return self.tmp_dir / f"fetch-{self.fetch_key(registry, digest)}"

    def fetch_writer(self, registry: str, digest: Digest, resume: bool = False) -> BlobWriter:
        """The writer of an upstream fetch, at the temp path named by its key (``fetch_temp_path``). The caller
        holds the key (the in-process single flight, or its file lock), so a file already there is a leftover
        of an interrupted fetch of the same key: it is removed first, or with ``resume`` reopened to continue
        it (its bytes re-hashed: ``written`` says how many). Blocking: call it in a thread."""
        path = self.fetch_temp_path(registry, digest)
        if resume:
            return BlobWriter(self, digest.algorithm, temp_path=path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return BlobWriter(self, digest.algorithm, name=path.name)

    async def put(self, data: bytes, expected: Digest | None = None) -> Digest:
        """Store a small blob held in memory (a manifest), verified like any other."""
        writer = await asyncio.to_thread(self.writer, expected.algorithm if expected else "sha256")
        await writer.write(data)
        return await writer.commit(expected, len(data))

    def publish_sync(self, temp_path: Path, digest: Digest) -> None:
        """Move a complete, verified, fsynced temp file into place: from now on ``digest`` is stored. A removal
        of ``digest`` withdrawn before (eviction) is cancelled: the new file stays."""
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._publishing:
            os.replace(temp_path, final)
            self._withdrawn.discard(digest)

    async def publish_file(self, temp_path: Path, digest: Digest) -> None:
        """A verified, fsynced file (a writer's, an upload session's data) becomes the blob: ``publish_sync``."""
        await asyncio.to_thread(self.publish_sync, temp_path, digest)

    def delete_sync(self, digest: Digest) -> bool:
        """Remove a stored blob; False if it was not there. Other OSErrors are raised."""
        try:
            self.path(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    async def delete(self, digest: Digest) -> bool:
        return await asyncio.to_thread(self.delete_sync, digest)

    # --- eviction: withdraw on the loop, remove in a thread ---------------------------------------------------
    def withdraw(self, digest: Digest) -> None:
        """Make ``digest`` absent at once (``size``/``read`` answer None) ahead of ``remove_withdrawn``.

        Called on the event loop, in the same step as the check of the digest's leases: a request that takes a
        lease before it looks the digest up either took it before this call (eviction saw the lease and skipped
        the digest) or looks it up after (a miss: it fetches the blob again). No await, no lock, no file work.
        """
        self._withdrawn.add(digest)

    def _remove_withdrawn_sync(self, digests: list[Digest]) -> list[Digest]:
        removed = []
        for digest in digests:
            with self._publishing:
                if digest not in self._withdrawn:
                    continue  # published again since it was withdrawn: the new file stays
                try:
                    self.path(digest).unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("cannot remove %s: %s", digest, exc)
                    continue
                finally:
                    self._withdrawn.discard(digest)
            removed.append(digest)
        return removed

    async def remove_withdrawn(self, digests: Iterable[Digest]) -> list[Digest]:
        """Unlink withdrawn digests in a thread; the ones removed (not published again meanwhile)."""
        return await asyncio.to_thread(self._remove_withdrawn_sync, list(digests))

    # --- housekeeping: walk, verify, quarantine (synchronous: callers run them in a thread) ---------------------
    def walk_sync(self) -> Iterator[StoredFile]:
        """Every entry under ``blobs/``, each file with its size and mtime (for start-up, gc and verify)."""
        if not self.root.is_dir():
            return
        for algorithm_dir in self.root.iterdir():
            if not algorithm_dir.is_dir():
                yield StoredFile("", algorithm_dir.name)
                continue
            for prefix_dir in algorithm_dir.iterdir():
                if not prefix_dir.is_dir():
                    yield StoredFile("", f"{algorithm_dir.name}/{prefix_dir.name}")
                    continue
                yield from self._walk_prefix(algorithm_dir.name, prefix_dir)

    def _walk_prefix(self, algorithm: str, prefix_dir: Path) -> Iterator[StoredFile]:
        for entry in os.scandir(prefix_dir):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            key = f"{algorithm}:{entry.name}"
            try:
                Digest.parse(key)
                valid = entry.is_file() and entry.name.startswith(prefix_dir.name)
            except Exception:
                valid = False
            location = f"{algorithm}/{prefix_dir.name}/{entry.name}"
            yield StoredFile(key if valid else "", location, st.st_size, st.st_mtime)

    def intact_sync(self, digest: Digest) -> bool | None:
        """Re-hash a stored file: True if it matches its digest, False if damaged, None if it is gone."""
        hasher = hashlib.new(digest.algorithm)
        try:
            with open(self.path(digest), "rb") as fh:
                while chunk := fh.read(HASH_CHUNK):
                    hasher.update(chunk)
        except FileNotFoundError:
            return None
        return hasher.hexdigest() == digest.hex

    def quarantine_sync(self, location: str, label: str) -> str:
        """Move the entry at ``location`` (from ``walk_sync``) out of ``blobs/`` into ``quarantine/`` (same
        filesystem: a rename), named after ``label``; where it went, for the log."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{label.replace(':', '-')}.{int(time.time())}"
        os.replace(self.root / location, target)
        return str(target)

    def sweep_tmp_sync(self, max_age: float, dry_run: bool = False) -> int:
        """Remove temp files untouched for ``max_age`` seconds (0: all of them); how many (would) go."""
        cutoff = time.time() - max_age
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.name.startswith(LOCK_PREFIX):
                continue  # a lock file is removed by its holder only (fetchlocks.py): removing it would break it
            with contextlib.suppress(FileNotFoundError):
                if max_age <= 0 or entry.stat().st_mtime < cutoff:
                    if not dry_run:
                        os.unlink(entry.path)
                    removed += 1
        return removed

    def probe_sync(self) -> None:
        """Write and remove a small file where fetches write (readiness); raises OSError if that fails. One file
        per call: concurrent probes never collide."""
        probe = self.tmp_dir / f".readyz-{secrets.token_hex(12)}"
        probe.write_bytes(b"ok")
        probe.unlink()

    def free_space_sync(self) -> int:
        """Bytes the data dir's filesystem can still take (for an unprivileged writer)."""
        stats = os.statvfs(self.tmp_dir)
        return stats.f_bavail * stats.f_frsize

    async def free_space(self) -> int:
        return await asyncio.to_thread(self.free_space_sync)

    def check_space_sync(self, size: int | None) -> None:
        """Raise DiskFull before a write of ``size`` bytes that the filesystem cannot take (a clear error for
        the client instead of a cut-off body half-way through)."""
        if not size:
            return
        free = self.free_space_sync()
        if free < size:
            raise DiskFull(f"{size} bytes needed, {free} free in {self.tmp_dir}")

    async def check_space(self, size: int | None) -> None:
        await asyncio.to_thread(self.check_space_sync, size)

    def clean_tmp(self) -> int:
        """Remove temp files of interrupted fetches and uploads; called at start-up, before serving."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
        if removed:
            log.info("removed %d temp files of interrupted fetches or uploads", removed)
        return removed

    def open_growing(self, temp_path: Path, digest: Digest) -> IO[bytes]:
        """Open a blob still being written at ``temp_path`` (a client streams it while it grows), or the
        published blob if the writer committed (renamed) it meanwhile. Raises FileNotFoundError when neither is
        there (the write failed and was removed, or is between rename and publish). Blocking: call it in a
        thread. The caller closes the file."""
        try:
            return open(temp_path, "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            return open(self.path(digest), "rb")  # noqa: SIM115
