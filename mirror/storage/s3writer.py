"""Writing one blob into the bucket: hashed while it streams into a multipart upload, completed only when size and
digest match, so no reader ever sees a partial or wrong object (S3 has no rename: the upload is the temp file).

Every byte also goes to a local temp file under the data dir's ``tmp/``, named as the disk writer names it, so
the miss path is unchanged: clients of a fetch tail the growing file (``open_growing``) while it is written. The
parts are read back from that file, 8 MiB at a time, so one part is in memory per writer however large the blob.
A writer that knows its digest (an upstream fetch) uploads each part as soon as it is in the file; one that learns
it only at ``commit`` (a manifest, a push) uploads its parts then, to the key of the digest it verified. The temp
file goes once the object is complete, or on ``abort`` with the upload's parts.

A file written and verified elsewhere (a push upload's session data, on local disk so that it survives a restart)
is published by a writer of that ``source`` file: its parts are read back from it and hashed again as they are
read, and the object is completed only if they still match the digest and size verified (``S3Store.publish_file``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from mirror.oci.reference import Digest
from mirror.storage.s3errors import bucket_errors
from mirror.storage.writer import DigestMismatch, SizeMismatch, write_hashed_sync

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

PART_SIZE = 8 << 20  # bytes per part of a multipart upload (S3's minimum is 5 MiB; at most 10,000 parts: 80 GiB)

log = logging.getLogger(__name__)


class Target(Protocol):
    """What a writer needs of its store."""

    @property
    def tmp_dir(self) -> Path: ...

    @property
    def bucket_name(self) -> str: ...

    def key(self, digest: Digest) -> str: ...

    async def client(self) -> S3Client: ...

    async def publish(self, digest: Digest, complete: Callable[[], Awaitable[None]]) -> None:
        """Run ``complete``, the writer's last requests (which make the object visible), as the publish of
        ``digest``: never interleaved with an eviction's removal of it."""
        ...

    def retain_sync(self, temp_path: Path, digest: Digest, size: int) -> None:
        """The complete object's temp file: kept as a local copy (renamed away) or left for the writer to remove."""
        ...


class S3Writer:
    """One blob on its way into the bucket. ``commit`` verifies and completes it, ``abort`` drops it."""

    def __init__(
        self,
        store: Target,
        algorithm: str = "sha256",
        name: str | None = None,
        digest: Digest | None = None,
        source: Path | None = None,
        resume: bool = False,
    ):
        """A new temp file under ``tmp/`` (named ``name``, or at random). With ``digest`` (an upstream fetch), parts
        go to that digest's key as they fill; the object is completed only if the content matches it. With
        ``source``, that complete file instead, nothing more written to it: ``commit`` reads it back (blocking:
        call it in a thread). With ``resume``, the file ``name`` already there is continued (a fetch taken over):
        its bytes are re-hashed and go into parts from the first write on, like any other."""
        self._store = store
        self._hasher = hashlib.new(algorithm)
        self._algorithm = algorithm
        self._digest = digest
        self._rehash = source is not None  # the parts are hashed as they are read back, not as they are written
        self.temp_path = source or store.tmp_dir / (name or f"fetch-{secrets.token_hex(12)}")
        mode = "rb" if source else "a+b" if resume else "x+b"
        self._file: IO[bytes] = open(self.temp_path, mode)  # noqa: SIM115 - closed in commit/abort
        self._closed = False
        self.written = os.fstat(self._file.fileno()).st_size if source else 0
        if resume:
            self._file.seek(0)
            while chunk := self._file.read(1 << 20):
                self._hasher.update(chunk)
                self.written += len(chunk)
        self._uploaded = 0  # bytes of the file in completed parts
        self._upload: tuple[str, str] | None = None  # (key, upload id) of the multipart upload, once started
        self._parts: list[CompletedPartTypeDef] = []

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await asyncio.to_thread(write_hashed_sync, self._file, self._hasher, data)
        self.written += len(data)
        if self._digest is not None:
            while self.written - self._uploaded >= PART_SIZE:
                with bucket_errors():
                    await self._upload_part(self.key_for(self._digest), self._uploaded + PART_SIZE)

    def mark(self) -> tuple[int, hashlib._Hash]:
        """The bytes written so far and their hash state (a copy)."""
        return self.written, self._hasher.copy()

    def key_for(self, digest: Digest) -> str:
        return self._store.key(digest)

    def _read_sync(self, end: int) -> bytes:
        data = os.pread(self._file.fileno(), end - self._uploaded, self._uploaded)
        if self._rehash:
            self._hasher.update(data)
        return data

    async def _read(self, end: int) -> bytes:
        return await asyncio.to_thread(self._read_sync, end)

    async def _upload_part(self, key: str, end: int) -> None:
        """Bytes ``_uploaded``..``end`` of the file as the next part of the upload to ``key`` (started if need be)."""
        client = await self._store.client()
        if self._upload is None:
            started = await client.create_multipart_upload(Bucket=self._store.bucket_name, Key=key)
            self._upload = (key, started["UploadId"])
        number = len(self._parts) + 1
        part = await client.upload_part(
            Bucket=self._store.bucket_name,
            Key=key,
            UploadId=self._upload[1],
            PartNumber=number,
            Body=await self._read(end),
        )
        self._parts.append({"ETag": part["ETag"], "PartNumber": number})
        self._uploaded = end

    def _verify(self, expected: Digest | None, expected_size: int | None) -> Digest:
        actual = Digest(self._algorithm, self._hasher.hexdigest())
        if expected_size is not None and expected_size != self.written:
            raise SizeMismatch(expected_size, self.written)
        expected = expected or self._digest
        if expected is not None and expected != actual:
            raise DigestMismatch(expected, actual)
        return actual

    async def commit(
        self,
        expected: Digest | None = None,
        expected_size: int | None = None,
        verified: Callable[[], None] | None = None,
    ) -> Digest:
        """Verify, then complete the object at its digest's key (``verified`` is called in between). On any failure
        the upload is aborted, the temp file removed and the error raised."""
        try:
            if self._rehash:  # verified in ``_finish``, once every byte has been read back
                if expected is None:
                    raise ValueError("publishing a file takes the digest it was verified as")
                digest = expected
            else:
                digest = self._verify(expected, expected_size)
                if verified is not None:
                    verified()
            with bucket_errors():
                await self._store.publish(digest, lambda: self._finish(digest, expected_size))
        except BaseException:
            await self.abort()
            raise
        await asyncio.to_thread(self._close_sync, digest)
        return digest

    async def _finish(self, digest: Digest, expected_size: int | None) -> None:
        """The rest of the parts and the request that makes the object visible: one PUT for a blob of one part
        that has none uploaded yet, else the last parts and CompleteMultipartUpload. A ``source`` file's bytes,
        hashed as they were read back, are verified just before that request."""
        key, client = self.key_for(digest), await self._store.client()
        if self._upload is None and self.written <= PART_SIZE:
            body = await self._read(self.written)
            if self._rehash:
                self._verify(digest, expected_size)
            await client.put_object(Bucket=self._store.bucket_name, Key=key, Body=body)
            return
        while self._uploaded < self.written:
            await self._upload_part(key, min(self._uploaded + PART_SIZE, self.written))
        if self._rehash:
            self._verify(digest, expected_size)
        assert self._upload is not None
        await client.complete_multipart_upload(
            Bucket=self._store.bucket_name, Key=key, UploadId=self._upload[1], MultipartUpload={"Parts": self._parts}
        )
        self._upload = None

    def _close_sync(self, complete: Digest | None = None) -> None:
        """Close the file and remove it; that of a ``complete`` object may become its local copy first."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._file.close()
        if complete is not None:
            try:
                self._store.retain_sync(self.temp_path, complete, self.written)
            except OSError as exc:  # the object is complete: a copy that cannot be kept is only a lost speed-up
                log.warning("cannot keep a local copy of %s: %s", complete, exc)
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()

    async def abort(self) -> None:
        """Drop the parts uploaded so far and the temp file."""
        upload, self._upload = self._upload, None
        if upload is not None:
            try:
                client = await self._store.client()
                await client.abort_multipart_upload(Bucket=self._store.bucket_name, Key=upload[0], UploadId=upload[1])
            except Exception as exc:  # the bucket's own expiry of incomplete uploads is the backstop
                log.warning("cannot abort the upload of %s: %s", upload[0], exc)
        await asyncio.to_thread(self._close_sync)
