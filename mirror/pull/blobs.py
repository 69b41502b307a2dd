"""THE blob miss path: a blob read answered from memory or the store (a hit), or fetched from the upstream once
however many clients ask (a miss), streamed to a temp file while clients read it, verified, published.

``BlobPuller.blob`` reads top to bottom: hit (memory, then store; vouched for the name), join or start the single
fetch (``pull.inflight.FetchCoordinator``), and the fetch's own task (``_fetch``): upstream, tee to the temp file
(``_pump``), verify and publish (``BlobWriterLike.commit``: digest and size checked, then renamed), record (origin,
usage). Streaming the growing file to a client is ``api.streaming.stream_fetch``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
from cachetools import LRUCache

from mirror.content import BlobAnswer, BlobHeadAnswer, MemoryBlob, StoredBlob
from mirror.metrics import Metrics
from mirror.oci import errors
from mirror.oci.reference import Digest, Repo
from mirror.pull.failures import failure, upstream_errors
from mirror.pull.inflight import FetchCoordinator, FetchState
from mirror.pull.resume import continue_body
from mirror.storage.base import BlobStorage, BlobWriterLike, MetadataIndex, UsageRecorder
from mirror.storage.writer import DiskFull
from mirror.upstream.bodies import BodyTooLarge, Throughput
from mirror.upstream.client import UpstreamClient
from mirror.upstream.errors import UpstreamInvalid

log = logging.getLogger(__name__)
WRITE_BATCH = 1 << 20  # bytes gathered from the upstream before one write to the temp file
WRITE_AHEAD = 8  # batches read from the upstream while earlier ones are still being written (and hashed)
# Blobs up to SMALL_BLOB bytes (image configs, tiny layers) are kept in memory, bounded in bytes (least recently
# used out first), and then answered without a thread hop or a sendfile.
SMALL_BLOB = 64 << 10
SMALL_BLOB_MEMORY_BYTES = 32 << 20


class Names(Protocol):
    """The per-name rules of the pull-through service (``PullThrough``) that the miss path obeys."""

    def client(self, repo: Repo) -> UpstreamClient: ...

    def timeout(self, repo: Repo) -> float: ...

    async def vouch(self, repo: Repo, digest: Digest, kind: str) -> None: ...

    async def add_origin(self, repo: Repo, digest: Digest) -> None: ...

    async def mark_pulled(self, repo: Repo) -> None: ...

    def count(self, repo: Repo, kind: str, result: str) -> None: ...


def blob_unknown(repo: Repo, digest: Digest) -> errors.RegistryError:
    return errors.BlobUnknown(f"blob {digest} is not in {repo}", detail={"digest": str(digest)})


class BlobPuller:
    def __init__(
        self,
        names: Names,
        store: BlobStorage,
        index: MetadataIndex,
        usage: UsageRecorder,
        metrics: Metrics,
        inflight: FetchCoordinator,
        cache_size: int = 0,  # the cache's cap (0: none): a blob without Content-Length may not grow past it
    ):
        self._names = names
        self._store = store
        self._index = index
        self._usage = usage
        self._metrics = metrics
        self._inflight = inflight
        self._cache_size = cache_size
        self._small_blobs: LRUCache[Digest, bytes] = LRUCache(SMALL_BLOB_MEMORY_BYTES, getsizeof=len)

    async def blob(self, repo: Repo, digest: Digest) -> BlobAnswer:
        """A stored blob (hit), or the fetch a client streams from (miss; joined if one is under way)."""
        hot = self._small_blobs.get(digest)
        if hot is not None:
            await self._names.vouch(repo, digest, "blob")
            return self._hit(repo, digest, MemoryBlob(hot))
        # (A replica whose usage table lists no such digest skips the bucket's HEAD: ``_fetch`` looks again.)
        size = await self._store.size(digest) if self._usage.may_hold(digest) else None
        if size is not None:
            await self._names.vouch(repo, digest, "blob")
            if size > SMALL_BLOB:
                return self._hit(repo, digest, StoredBlob(self._store.path(digest), size))
            data = await self._store.read_verified(digest)
            if data is not None:
                self._small_blobs[digest] = data
                return self._hit(repo, digest, MemoryBlob(data))
            await self._store.delete(digest)  # damaged on disk (logged): fetched again below
        client = self._names.client(repo)
        fetch, started = self._inflight.join(
            repo.registry, digest, lambda f: self._fetch(client, repo, f), f"{repo.registry}/{repo.path}"
        )
        if not started:
            self._metrics.coalesced_waiters.labels(repo.registry).inc()
        try:
            await fetch.wait_started()
        except errors.RegistryError:
            self._names.count(repo, "blob", "miss")
            raise
        except Exception as exc:  # whatever ended the fetch before its first byte
            self._names.count(repo, "blob", "miss")
            raise failure(exc, lambda: blob_unknown(repo, digest)) from None
        await self._names.mark_pulled(repo)
        if fetch.final_path is not None and fetch.written == 0 and fetch.size is None:
            # The fetch found it stored (committed meanwhile, or stored by another replica whose record this one
            # had not read yet): a hit, and served now, so the most recently used.
            return self._hit(repo, digest, StoredBlob(fetch.final_path, await self._store.size(digest) or 0))
        self._names.count(repo, "blob", "miss")
        if fetch.verified and not started:
            # Every byte is here and right, and the store is publishing it (an fsync: tens of ms, more for a large
            # blob): a later client is answered as the hit it is about to be, with everything a hit honours
            # (conditionals). The client that started the fetch streams it (its bytes count as fetched).
            await fetch.wait_done()
            if fetch.final_path is None:
                raise failure(fetch.error or RuntimeError(f"the fetch of {digest} ended without a result"))
            return StoredBlob(fetch.final_path, fetch.written)
        return fetch

    def _hit(self, repo: Repo, digest: Digest, answer: StoredBlob | MemoryBlob) -> StoredBlob | MemoryBlob:
        self._names.count(repo, "blob", "hit")
        self._usage.touch(digest)
        return answer

    async def blob_head(self, repo: Repo, digest: Digest) -> BlobHeadAnswer:
        """What a HEAD needs: the stored blob, the fetch under way, or the size the upstream announces. A HEAD
        never starts a download."""
        hot = self._small_blobs.get(digest)
        if hot is not None:
            await self._names.vouch(repo, digest, "blob")
            return MemoryBlob(hot)
        size = await self._store.size(digest)
        if size is not None:
            await self._names.vouch(repo, digest, "blob")
            return StoredBlob(self._store.path(digest), size)
        fetch = self._inflight.get(repo.registry, digest)
        if fetch is not None and fetch.size is not None:
            return fetch
        announced = await self._inflight.announced(repo.registry, digest)  # fetched by another process
        if announced is not None:
            return announced
        with upstream_errors(not_found=lambda: blob_unknown(repo, digest)):
            async with asyncio.timeout(self._names.timeout(repo)):
                return await self._names.client(repo).head_blob(repo.path, digest)

    async def _fetch(self, client: UpstreamClient, repo: Repo, fetch: FetchState) -> None:
        """Runs as the fetch's own task: upstream -> temp file (hashed on the fly) -> verify -> publish -> record.
        With ``fetch.resume`` it continues the temp file an interrupted fetch left (``pull.resume``)."""
        digest = fetch.digest
        # Committed between the caller's check (if it made one) and join(), unless the coordinator knows better.
        if not fetch.unstored and await self._store.size(digest) is not None:
            await self._names.vouch(repo, digest, "blob")
            fetch.finish(self._store.path(digest))
            return
        self._metrics.inflight_fetches.inc()
        writer = await asyncio.to_thread(self._store.fetch_writer, repo.registry, digest, fetch.resume)
        expected: int | None = None
        try:
            if fetch.resume:
                fetch.advance(writer.written)  # what the file holds (its clients may have seen less of it)
            if not (fetch.resume and writer.written == fetch.size):  # else only the digest check was left to do
                expected = await self._receive(client, repo, fetch, writer)
            # Who sent it is recorded before it is stored: a stored blob without an origin record is old content
            # that any name may be answered (``vouch``), so it must never exist, even for a moment, for new content.
            await self._names.add_origin(repo, digest)
            try:
                await writer.commit(digest, fetch.size, verified=fetch.verify)
            except Exception as exc:
                raise UpstreamInvalid(f"blob {digest} from {repo}: {exc}") from exc
            await self._usage.added(digest, fetch.written, "blob", str(repo))
            fetch.finish(self._store.path(digest))
            log.info("cached blob %s (%d bytes) from %s", digest, fetch.written, repo)
        except BaseException as exc:
            await writer.abort()
            fetch.fail(exc)
            log.warning("fetch of blob %s from %s failed: %s", digest, repo, exc)
            raise
        finally:
            self._usage.expect(-expected if expected else None)
            self._metrics.inflight_fetches.dec()

    async def _receive(
        self, client: UpstreamClient, repo: Repo, fetch: FetchState, writer: BlobWriterLike
    ) -> int | None:
        """The upstream's body into ``writer`` (from ``writer.written`` on when resuming); the bytes expected,
        which the caller un-expects once the blob is recorded (here if this fails)."""
        fetched = self._metrics.upstream_bytes_fetched.labels(repo.registry)
        # A Content-Length past max_blob_size is refused by client.blob before any byte is read.
        async with client.blob(repo.path, fetch.digest, writer.written) as resp:
            if fetch.resume:
                assert fetch.size is not None  # only a fetch of a known size is resumed (pull.filelock)
                rest: int | None = await continue_body(resp, writer, fetch.size, fetched)
            else:
                rest = resp.content_length
            await self._store.check_space(rest)  # DiskFull -> a clear 507, not a cut body
            bound = await self._size_bound(client, rest)
            self._usage.expect(rest)
            try:
                fetch.begin(fetch.size if fetch.resume else resp.content_length, writer.temp_path)
                floor = Throughput(client.settings.min_rate, client.settings.rate_window)
                await _pump(resp.content, writer, fetch, fetched, floor, bound)
            except BaseException:
                self._usage.expect(-rest if rest else None)
                raise
        return rest

    async def _size_bound(self, client: UpstreamClient, announced: int | None) -> tuple[int, Exception]:
        """How far a body may grow, and the error past that: its Content-Length (aiohttp reads no further), or
        without one the least of max_blob_size, the cache's cap and the disk's free space."""
        if announced is not None:
            return announced, UpstreamInvalid("body longer than its Content-Length")
        bounds: list[tuple[int, Exception]] = [
            (client.settings.max_blob_size, BodyTooLarge("blob", client.settings.max_blob_size, "max_blob_size")),
            (
                free := await self._store.free_space(),
                DiskFull(f"blob without Content-Length outgrew the {free} bytes free"),
            ),
        ]
        if self._cache_size:
            bounds.append((self._cache_size, DiskFull(f"blob larger than the whole cache ({self._cache_size} bytes)")))
        return min(bounds, key=lambda bound: bound[0])


async def _pump(
    content: aiohttp.StreamReader,
    writer: BlobWriterLike,
    fetch: FetchState,
    fetched: Any,
    floor: Throughput,
    bound: tuple[int, Exception],
) -> None:
    """Upstream body -> temp file, reading the next batches while earlier ones are written and hashed in a
    thread (at most WRITE_AHEAD batches in memory), so the network and the disk work at the same time. If
    reading fails, the write under way is let finish (a thread cannot be stopped) before the error goes up, so
    the caller's abort never races a write. The body may not grow past ``bound`` (its error is raised then) nor
    arrive slower than ``floor`` allows (TooSlow)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(WRITE_AHEAD)
    stop = False
    limit, too_big = bound
    received = 0

    async def write_all() -> None:
        while (chunk := await queue.get()) and not stop:
            await writer.write(chunk)
            fetch.advance(writer.written)
            fetched.inc(len(chunk))

    writing = asyncio.create_task(write_all())
    try:
        async with floor:
            async for chunk in _batched(content):
                received += len(chunk)
                if received > limit:
                    raise too_big
                floor.advance(len(chunk))
                if not await _put(queue, chunk, writing):
                    break  # the write failed: its error is raised below
        await _put(queue, b"", writing)
        await writing
    finally:
        if not writing.done():
            stop = True
            if not queue.full():
                queue.put_nowait(b"")
            await asyncio.wait((writing,))
        if not writing.cancelled() and writing.exception() is not None:
            log.debug("write stopped: %s", writing.exception())


async def _put(queue: asyncio.Queue[bytes], chunk: bytes, writing: asyncio.Task[None]) -> bool:
    """Queue ``chunk`` for the writer; False if the writer ended (it failed) instead."""
    if writing.done():
        return False
    if not queue.full():
        queue.put_nowait(chunk)
        return True
    put = asyncio.ensure_future(queue.put(chunk))
    await asyncio.wait((put, writing), return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        return False
    return True


async def _batched(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Yield the body in pieces of up to WRITE_BATCH bytes without waiting for a full batch: whatever is buffered
    goes out as soon as nothing more is immediately available, so slow upstreams still stream promptly."""
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        parts = [chunk]
        size = len(chunk)
        while size < WRITE_BATCH:
            more = content.read_nowait(WRITE_BATCH - size)
            if not more:
                break
            parts.append(more)
            size += len(more)
        yield chunk if len(parts) == 1 else b"".join(parts)
