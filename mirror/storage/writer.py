"""Writing one blob: a temp file filled and hashed on the fly, published only once its size and digest match.

``BlobWriter`` is what every write of content goes through on local disk (upstream fetches, push uploads,
manifests). It knows of its store only what ``Publisher`` says: where temp files go and how a verified, fsynced
file is published (``publish_file``: renamed into place on disk, read back into the bucket of an object store), so
nothing partial is ever visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from mirror.oci.reference import Digest


class Publisher(Protocol):
    """What a writer needs of its store."""

    @property
    def tmp_dir(self) -> Path: ...

    async def publish_file(self, temp_path: Path, digest: Digest) -> None:
        """A closed file whose content was verified as ``digest`` becomes the stored blob (the file is consumed)."""
        ...


WRITE_SLICE = 256 << 10  # bytes per write() and hash update inside one BlobWriter.write


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest the writer was opened for."""

    def __init__(self, expected: Digest, actual: Digest):
        super().__init__(f"content hashes to {actual}, expected {expected}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(Exception):
    def __init__(self, expected: int, actual: int):
        super().__init__(f"content is {actual} bytes, expected {expected}")
        self.expected = expected
        self.actual = actual


class DiskFull(Exception):
    """The data dir's filesystem ran out of space (or quota) while writing."""


def write_hashed_sync(file: IO[bytes], hasher: hashlib._Hash, data: bytes | bytearray | memoryview) -> None:
    """Write and hash ``data`` a slice at a time: each slice is hashed while it is still in the CPU cache from the
    write, and the kernel copies smaller pieces (half the system time per GiB of one big write here). A full disk
    is ``DiskFull``."""
    view = memoryview(data)
    try:
        for start in range(0, len(view), WRITE_SLICE):
            piece = view[start : start + WRITE_SLICE]
            file.write(piece)
            hasher.update(piece)
        file.flush()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(str(exc)) from exc
        raise


class BlobWriter:
    """One temp file being filled, hashed on the fly. Use ``commit`` to publish it, ``abort`` to drop it.

    File work runs in a thread (``asyncio.to_thread``); ``written`` counts bytes that are in the file, so a
    concurrent reader of ``temp_path`` may read up to that offset.
    """

    def __init__(
        self, store: Publisher, algorithm: str = "sha256", temp_path: Path | None = None, name: str | None = None
    ):
        """A new temp file under ``tmp/`` (named ``name``, or at random); or, with ``temp_path`` (a push upload's
        data file, which lives outside ``tmp/`` so that it survives a restart), that file reopened for appending,
        its bytes so far re-hashed."""
        self._store = store
        self._hasher = hashlib.new(algorithm)
        self._algorithm = algorithm
        self.written = 0
        self._closed = False
        self._file: IO[bytes]
        if temp_path is None:
            self.temp_path = store.tmp_dir / (name or f"fetch-{secrets.token_hex(12)}")
            self._file = open(self.temp_path, "xb")  # noqa: SIM115 - closed in commit/abort
        else:
            self.temp_path = temp_path
            self._file = open(temp_path, "a+b")  # noqa: SIM115 - closed in commit/abort/detach
            self._file.seek(0)
            while chunk := self._file.read(1 << 20):
                self._hasher.update(chunk)
                self.written += len(chunk)

    def _write_sync(self, data: bytes | bytearray | memoryview) -> None:
        write_hashed_sync(self._file, self._hasher, data)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await asyncio.to_thread(self._write_sync, data)
        self.written += len(data)

    def _verify(self, expected: Digest | None, expected_size: int | None) -> Digest:
        actual = Digest(self._algorithm, self._hasher.hexdigest())
        if expected_size is not None and expected_size != self.written:
            raise SizeMismatch(expected_size, self.written)
        if expected is not None and expected != actual:
            raise DigestMismatch(expected, actual)
        return actual

    def _seal_sync(self, actual: Digest) -> Digest:
        """fsync and close the verified file."""
        try:
            os.fsync(self._file.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(exc)) from exc
            raise
        self._file.close()
        self._closed = True
        return actual

    async def commit(
        self,
        expected: Digest | None = None,
        expected_size: int | None = None,
        verified: Callable[[], None] | None = None,
    ) -> Digest:
        """Verify and publish (``verified`` is called in between). On any failure the temp file is removed and the
        error raised."""
        try:
            digest = self._verify(expected, expected_size)  # the running hash: no byte is read again
            if verified is not None:
                verified()
            await asyncio.to_thread(self._seal_sync, digest)
            await self._store.publish_file(self.temp_path, digest)
        except BaseException:
            await self.abort()
            raise
        return digest

    def _abort_sync(self) -> None:
        if not self._closed:
            self._closed = True
            # On a full disk close() fails again flushing the buffered bytes (the file is closed anyway):
            # the temp file must still go.
            with contextlib.suppress(OSError):
                self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()

    async def abort(self) -> None:
        await asyncio.to_thread(self._abort_sync)

    # --- resumable writes (push uploads) ---------------------------------------------------------------------
    def mark(self) -> tuple[int, hashlib._Hash]:
        """A point to ``rollback`` to: a chunk that fails half-way is undone, so an upload session only ever
        holds whole chunks."""
        return self.written, self._hasher.copy()

    def _rollback_sync(self, mark: tuple[int, hashlib._Hash]) -> None:
        written, hasher = mark
        self._file.flush()
        self._file.truncate(written)
        self._hasher = hasher.copy()
        self.written = written

    async def rollback(self, mark: tuple[int, hashlib._Hash]) -> None:
        await asyncio.to_thread(self._rollback_sync, mark)

    def detach_sync(self) -> None:
        """Close the file but keep it: the upload it belongs to can be resumed later by a new writer."""
        if not self._closed:
            self._file.close()
            self._closed = True
