"""Blob uploads (OCI distribution spec, "Pushing blobs"): every variant real clients use.

- monolithic: ``POST ...?digest=`` with the whole body;
- ``POST`` then one ``PUT ...?digest=`` carrying the body;
- chunked: ``PATCH`` with ``Content-Range: <start>-<end>`` in order (any other start is a 416), then ``PUT``;
- streamed: ``PATCH`` without ``Content-Range`` (Docker, containerd), then an empty ``PUT``.

Every byte is hashed as it is written (``BlobWriter``, to local disk); a blob becomes visible only when ``PUT``
names a digest that matches, by one rename (disk) or one completed multipart upload read back from the file
(object storage: ``BlobStorage.publish_file``). A chunk is all or nothing: one that fails half-way (client gone,
wrong length, disk full) is rolled back, so the session's size is always what the client was last told. Sessions
live on disk (``storage.sessions``) and resume with the same upload URL after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable

from mirror.metrics import Metrics
from mirror.oci import errors
from mirror.oci.reference import Digest, Repo
from mirror.storage.base import BlobStorage
from mirror.storage.sessions import TooManySessions, UploadSession, UploadSessions
from mirror.storage.writer import BlobWriter, DigestMismatch, DiskFull, SizeMismatch

log = logging.getLogger(__name__)
BlobArrived = Callable[[Repo, Digest], Awaitable[None]]


def upload_location(repo: Repo, uuid: str) -> str:
    return f"/v2/{repo.path}/blobs/uploads/{uuid}"


def upload_headers(repo: Repo, session: UploadSession) -> dict[str, str]:
    """What every answer about a session carries: where it is, and the bytes it holds (``Range`` is inclusive;
    an empty session says ``0-0``, as Distribution does)."""
    return {
        "Location": upload_location(repo, session.uuid),
        "Range": f"0-{max(session.size - 1, 0)}",
        "Docker-Upload-UUID": session.uuid,
    }


async def _noop(repo: Repo, digest: Digest) -> None:
    return None


class Uploads:
    def __init__(self, store: BlobStorage, sessions: UploadSessions, metrics: Metrics):
        self._store = store
        self.sessions = sessions
        self._metrics = metrics
        self.on_blob: BlobArrived = _noop  # set by LocalRegistry: link the blob, make the repository local

    async def start(self, repo: Repo, client: str = "") -> UploadSession:
        """A new session for ``client`` (its address); 429 TOOMANYREQUESTS past the per-client or total cap."""
        try:
            session = await self.sessions.create(repo.path, client)
        except TooManySessions as exc:
            raise errors.TooManyRequests(
                f"{exc}: finish or cancel some before starting another",
                detail={"scope": exc.scope, "limit": exc.limit},
            ) from None
        self._metrics.upload_sessions_started.inc()
        return session

    async def _session(self, repo: Repo, uuid: str) -> UploadSession:
        session = await self.sessions.load(uuid)
        if session is None or session.repo != repo.path:
            raise errors.BlobUploadUnknown(
                f"no upload session {uuid[:64]!r} for {repo.path}", detail={"uuid": uuid[:64]}
            )
        return session

    async def holds(self, uuid: str) -> bool:
        """Whether the session ``uuid`` is on this data dir (another replica may hold it: ``api.forward``)."""
        return await asyncio.to_thread(self.sessions.exists_sync, uuid)

    async def status(self, repo: Repo, uuid: str) -> UploadSession:
        return await self._session(repo, uuid)

    def _expected(
        self, repo: Repo, session: UploadSession, content_range: tuple[int, int] | None, content_length: int | None
    ) -> int | None:
        """How many bytes the body must hold: the ``Content-Range`` (416 unless it starts where the session ends;
        it must agree with ``Content-Length``), else ``Content-Length``, else whatever arrives."""
        if content_range is None:
            return content_length
        start, end = content_range
        if start != session.size or end < start:
            raise errors.RangeInvalid(
                f"chunk {start}-{end} does not continue the upload, which holds {session.size} bytes",
                detail={"size": session.size},
                headers=upload_headers(repo, session),
            )
        if content_length is not None and content_length != end - start + 1:
            raise errors.SizeInvalid(
                f"Content-Length {content_length} does not match Content-Range {start}-{end}",
                detail={"size": session.size},
            )
        return end - start + 1

    async def _receive(self, writer: BlobWriter, body: AsyncIterable[bytes], expected: int | None) -> int:
        """Append a body to the writer, all or nothing; ``expected`` bytes exactly when given."""
        mark = writer.mark()
        try:
            async for chunk in body:
                if expected is not None and writer.written - mark[0] + len(chunk) > expected:
                    raise errors.SizeInvalid(f"the body is longer than the {expected} bytes announced")
                await writer.write(chunk)
            received = writer.written - mark[0]
            if expected is not None and received != expected:
                raise errors.SizeInvalid(f"received {received} bytes, {expected} were announced")
        except DiskFull:
            await writer.rollback(mark)
            raise errors.InsufficientStorage("the mirror's disk is full; the chunk was not stored") from None
        except BaseException:
            await writer.rollback(mark)
            raise
        self._metrics.push_bytes_received.inc(received)
        return received

    async def append(
        self,
        repo: Repo,
        uuid: str,
        body: AsyncIterable[bytes],
        content_range: tuple[int, int] | None,
        content_length: int | None,
    ) -> UploadSession:
        """``PATCH``: one chunk (with ``Content-Range``) or a stream (without)."""
        await self._session(repo, uuid)
        async with self.sessions.lock(uuid):
            session = await self._session(repo, uuid)  # it may have been cancelled while we waited
            writer = await self.sessions.writer(session)
            expected = self._expected(repo, session, content_range, content_length)
            await self._receive(writer, body, expected)
            await self.sessions.acknowledge(session, writer.written)
            return session

    async def finish(
        self,
        repo: Repo,
        uuid: str,
        digest: Digest,
        body: AsyncIterable[bytes],
        content_range: tuple[int, int] | None,
        content_length: int | None,
    ) -> Digest:
        """``PUT ...?digest=``: the last chunk, if any, then verify and publish. A digest that does not match ends
        the session (as Distribution does): nothing of it stays."""
        await self._session(repo, uuid)
        async with self.sessions.lock(uuid):
            session = await self._session(repo, uuid)
            writer = await self.sessions.writer(session)
            expected = self._expected(repo, session, content_range, content_length)
            await self._receive(writer, body, expected)
            self.sessions.forget_writer(uuid)
            try:
                await self._commit(writer, digest)
            finally:
                await self.sessions.remove(uuid)
        await self.on_blob(repo, digest)
        log.info("pushed blob %s (%d bytes) to %s", digest, writer.written, repo.path)
        return digest

    async def _commit(self, writer: BlobWriter, digest: Digest) -> None:
        try:
            if digest.algorithm == "sha256":
                await writer.commit(digest)
            else:
                await self._commit_rehashed(writer, digest)
        except (DigestMismatch, SizeMismatch) as exc:
            raise errors.DigestInvalid(
                f"the uploaded content does not match {digest}: {exc}", detail={"digest": str(digest)}
            ) from None
        except DiskFull:
            raise errors.InsufficientStorage("the mirror's disk is full; the blob was not stored") from None

    async def _commit_rehashed(self, writer: BlobWriter, digest: Digest) -> None:
        """A digest of another algorithm than the one hashed on the fly (sha512): hash the data again with it."""
        await asyncio.to_thread(writer.detach_sync)
        other = await asyncio.to_thread(self._store.writer, digest.algorithm)
        try:
            fh = await asyncio.to_thread(self._store.open_growing, writer.temp_path, digest)
            try:
                while chunk := await asyncio.to_thread(fh.read, 1 << 20):
                    await other.write(chunk)
            finally:
                await asyncio.to_thread(fh.close)
        except BaseException:
            await other.abort()
            raise
        finally:
            await writer.abort()
        await other.commit(digest)

    async def cancel(self, repo: Repo, uuid: str) -> None:
        await self._session(repo, uuid)
        async with self.sessions.lock(uuid):
            await self._session(repo, uuid)
            await self.sessions.remove(uuid)

    async def monolithic(
        self, repo: Repo, digest: Digest, body: AsyncIterable[bytes], content_length: int | None
    ) -> Digest:
        """``POST ...?digest=`` with the whole blob: no session at all (a temp file on local disk, as a session's
        data is, published through the store)."""
        writer = await asyncio.to_thread(BlobWriter, self._store, digest.algorithm)
        try:
            await self._receive(writer, body, content_length)
        except BaseException:
            await writer.abort()
            raise
        await self._commit(writer, digest)
        await self.on_blob(repo, digest)
        return digest
