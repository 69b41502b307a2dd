"""Fetch coordination across replicas sharing one bucket: one upstream fetch per (upstream, digest) for the whole
cluster, by a lease per key in Redis (``storage.leases``), and every other replica streaming the bytes live from
the lease holder (``api.peer`` serves them, ``upstream.peers`` reads them).

Inside a replica the in-process single flight (``InFlight``) still runs: however many of its clients ask, one task
per key coordinates with the other replicas. That task takes the key's lease (one Redis round trip):

1. it got it: it is the **holder**. It runs the fetch (``BlobPuller._fetch``: upstream -> temp file -> multipart
   upload, completed only once verified), renewing the lease every third of its TTL, and releases it
   (compare-and-delete) once the object is complete in the bucket or the fetch failed. Its peer endpoint serves
   the growing temp file to the other replicas exactly as to its own clients: all but the last byte until the
   digest is verified, the connection cut if the fetch fails.
2. another replica holds it: this one is a **follower**. It streams the holder's bytes (``Range`` from where it is
   when it reconnects) into a temp file of its own, which its clients stream as they would any fetch, hashes
   them, and lets its clients have the last byte only once it has verified the digest itself: a replica never
   serves bytes it has not verified. It uploads nothing: the holder's upload is the one object. The holder sends
   the last byte once it verified the digest, not once the object is complete, so the follower's clients do not
   wait for the holder's upload; the follower's fetch ends when the object is in the bucket (or, if the holder
   lets the lease go without completing it, the follower takes the lease and uploads its own verified bytes).
3. the holder is gone (404: it runs no such fetch; or it cannot be reached or cut the stream): if the object is
   complete in the bucket, a follower that has no bytes yet lets the miss path serve it from there; otherwise it
   tries the lease again, and once the dead holder's lease has expired (or a failed holder released it) it takes
   it and runs the fetch itself if it has no bytes yet. A follower that has bytes of a holder that is gone cuts
   its clients (they resume with ``Range``): never a complete wrong body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from mirror.metrics import Metrics
from mirror.oci import errors
from mirror.oci.reference import Digest
from mirror.pull.inflight import Fetch, FetchCoordinator, FetchRun, FetchState, InFlight, RemoteFetch
from mirror.storage.base import BlobStorage, BlobWriterLike, RemoteBlobs, StoreUnavailable
from mirror.storage.cluster import raise_if_cancelled
from mirror.storage.leases import STORED, Holder, Leases
from mirror.storage.members import HeldFetch
from mirror.upstream.peers import PeerBody, PeerClient, PeerGone, PeerMissing

log = logging.getLogger(__name__)
POLL = 0.2  # seconds between looks at a lease whose holder cannot be reached (Redis tells nobody of an expiry)
STORED_POLL = 0.01  # seconds before the first look again for the object a holder is completing (doubling to POLL)
READ = 1 << 20  # bytes gathered from a peer's stream before one write to the temp file


class TempFile(BlobWriterLike, Protocol):
    """A follower's temp file at the fetch's key (the disk store's writer), hashed, never published; kept on disk
    by ``detach_sync`` for the store's resuming writer when this replica takes the fetch over."""

    def detach_sync(self) -> None: ...


TempWriter = Callable[[str, Digest], TempFile]


class SharedStore(BlobStorage, RemoteBlobs, Protocol):
    """The bucket the replicas share: a store whose objects can be streamed (``storage.s3.S3Store``)."""

    async def abort_uploads(self, digest: Digest) -> int: ...


class LeasedFetch(Fetch):
    """A ``Fetch`` with the lease value it takes (or took): ``held`` while this replica holds it, so its peer
    endpoint serves it to followers who name ``holder.fetch_id``."""

    def __init__(self, digest: Digest, repo: str = "", advertise: str = ""):
        super().__init__(digest, repo)
        self.holder = Holder.new(advertise)
        self.held = False
        self.on_begin: Callable[[int], None] | None = None  # while held: the size told to the other replicas

    def begin(self, size: int | None, temp_path: Path) -> None:
        super().begin(size, temp_path)
        if self.on_begin is not None and size is not None:
            self.on_begin(size)


def lost(digest: Digest, why: str) -> errors.RegistryError:
    return errors.UpstreamUnavailable(f"the fetch of blob {digest} on another replica {why}; retry")


class Leased:
    """The ``FetchCoordinator`` of replicas sharing a bucket and a Redis. Owned by the app (no module state)."""

    def __init__(
        self,
        leases: Leases,
        peers: PeerClient,
        advertise: str,
        store: SharedStore,
        temp_writer: TempWriter,
        metrics: Metrics,
        poll: float = POLL,
        others: Callable[[], Awaitable[list[RemoteFetch]]] | None = None,
        stored_ttl: float = 60.0,
    ):
        self._stored_ttl = stored_ttl  # seconds the "stored" mark of a completed fetch lives (``storage.leases``)
        self._others = others  # the fetches the other replicas hold, as their heartbeats list them
        self._leases = leases
        self._peers = peers
        self._store = store
        self._temp_writer = temp_writer
        self._metrics = metrics
        self._poll = poll
        self._inflight = InFlight(lambda digest, repo: LeasedFetch(digest, repo, advertise))

    def join(self, registry: str, digest: Digest, run: FetchRun, repo: str = "") -> tuple[FetchState, bool]:
        async def coordinated(fetch: FetchState) -> None:
            assert isinstance(fetch, LeasedFetch)  # made by this InFlight
            await self._coordinate(registry, fetch, run)

        return self._inflight.join(registry, digest, coordinated, repo)

    def serving(self, registry: str, digest: Digest, fetch_id: str) -> FetchState | None:
        """The fetch this replica holds the lease of under ``fetch_id``, for a follower (``api.peer``)."""
        fetch = self._inflight.get(registry, digest)
        if isinstance(fetch, LeasedFetch) and fetch.held and fetch.holder.fetch_id == fetch_id:
            return fetch
        return None

    def under_way(self) -> list[tuple[str, FetchState]]:
        return self._inflight.under_way()

    def held(self) -> list[HeldFetch]:
        """The fetches this replica holds the lease of (it runs them for the cluster), for its heartbeat."""
        wall = time.time() - time.monotonic()
        return [
            HeldFetch(registry, str(fetch.digest), fetch.repo, fetch.size, fetch.written, wall + fetch.started_at)
            for registry, fetch in self._inflight.under_way()
            if isinstance(fetch, LeasedFetch) and fetch.held
        ]

    async def elsewhere(self) -> list[RemoteFetch]:
        """The fetches the other replicas hold that this one does not follow (from their last heartbeats); none
        while Redis cannot be asked."""
        if self._others is None:
            return []
        own = {(registry, fetch.digest) for registry, fetch in self._inflight.under_way()}
        try:
            found = await self._others()
        except StoreUnavailable:
            return []
        return [fetch for fetch in found if (fetch.registry, fetch.digest) not in own]

    def get(self, registry: str, digest: Digest) -> FetchState | None:
        return self._inflight.get(registry, digest)

    def fetching(self, digest: Digest) -> bool:
        return self._inflight.fetching(digest)

    async def announced(self, registry: str, digest: Digest) -> int | None:
        return await self._leases.announced(registry, digest)

    async def close(self) -> None:
        await self._inflight.close()
        await self._peers.close()

    # --- one key's coordinating task ---------------------------------------------------------------------------
    async def _coordinate(self, registry: str, fetch: LeasedFetch, run: FetchRun) -> None:
        writer: list[TempFile] = []  # the follower's temp file, once a holder answered
        wait = STORED_POLL
        try:
            while not fetch.done:
                current = await self._leases.take(registry, fetch.digest, fetch.holder)
                if current is None:
                    # No fetch of it stored the object lately (that leaves the mark): nor did anything else that
                    # this replica's usage table would not list yet, or its miss path would have seen it.
                    fetch.unstored = not writer
                    await self._holding(registry, fetch, run, writer)
                    return
                if current == STORED:  # (the holder completed the object, or another fetch did lately)
                    if not await self._after_stored(registry, fetch, writer):
                        return
                    continue
                if fetch.verified:  # our clients have every byte: the holder is completing the object
                    await asyncio.sleep(wait)
                    wait = min(2 * wait, self._poll)
                    continue
                try:
                    await self._follow(registry, fetch, current, writer)
                except PeerMissing as exc:
                    # It runs no such fetch: not yet (it took the lease a moment ago) or no longer (the lease
                    # then says "stored" or is free). Ask the lease again soon.
                    log.info("following %s for blob %s: %s", current.advertise, fetch.digest, exc)
                    await asyncio.sleep(wait)
                    wait = min(2 * wait, self._poll)
                except PeerGone as exc:
                    log.info("following %s for blob %s: %s", current.advertise, fetch.digest, exc)
                    if not await self._after_holder(fetch, writer):
                        return
        finally:
            for file in writer:
                await file.abort()  # the follower's temp file: its clients hold it open, or read the bucket

    async def _holding(self, registry: str, fetch: LeasedFetch, run: FetchRun, writer: list[TempFile]) -> None:
        """With the lease ours: run the fetch; a follower with bytes of a holder that is gone takes it over,
        continuing its own temp file with an upstream Range request (``pull.resume``) and uploading the object."""
        if writer:
            if fetch.size is None:  # never began: never the case for a follower with a temp file
                with contextlib.suppress(StoreUnavailable):
                    await self._leases.release(registry, fetch.digest, fetch.holder)
                fetch.fail(lost(fetch.digest, "stopped before the end"))
                return
            if await self._store.size(fetch.digest) is not None and (
                fetch.verified or await self._rest_from_bucket(fetch, writer[0])
            ):
                if not fetch.done:
                    fetch.finish(self._store.path(fetch.digest))
                await self._leases.release(registry, fetch.digest, fetch.holder)  # completed as we took it
                return
            file = writer.pop()  # the store's resuming writer continues the file: it is no longer ours to remove
            await asyncio.to_thread(file.detach_sync)
            log.info("taking over the fetch of blob %s at %d bytes from a replica that is gone", fetch.digest,
                     fetch.written)  # fmt: skip
            self._metrics.takeovers.inc()
            fetch.resume = True
            await self._abort_left(fetch)
        await self._lead(registry, fetch, run)

    async def _abort_left(self, fetch: LeasedFetch) -> None:
        """The upload the gone holder left unfinished: its parts go (best effort: a lifecycle rule is the net)."""
        try:
            if aborted := await self._store.abort_uploads(fetch.digest):
                log.info("aborted %d unfinished upload(s) of blob %s left by the replica gone", aborted, fetch.digest)
        except StoreUnavailable as exc:
            log.warning("cannot abort the uploads of blob %s left by the replica gone: %s", fetch.digest, exc)

    async def _lead(self, registry: str, fetch: LeasedFetch, run: FetchRun) -> None:
        """Run the fetch holding the lease, renewed meanwhile; released once the fetch ended either way."""
        fetch.held = True
        self._metrics.leases_held.inc()
        renewing = asyncio.create_task(self._renew(registry, fetch))
        announcing: list[asyncio.Task[None]] = []

        def announce(size: int) -> None:
            announcing.append(asyncio.create_task(self._announce(registry, fetch, size)))

        fetch.on_begin = announce
        if fetch.size is not None:  # taken over: the size is known already
            announce(fetch.size)
        try:
            await run(fetch)
        finally:
            fetch.held, fetch.on_begin = False, None
            await asyncio.gather(*announcing, return_exceptions=True)
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            self._metrics.leases_held.dec()
            try:
                if fetch.final_path is not None and fetch.error is None:  # stored: the lease becomes the mark
                    await self._leases.finish(registry, fetch.digest, fetch.holder, self._stored_ttl)
                else:
                    await self._leases.release(registry, fetch.digest, fetch.holder)
            except StoreUnavailable as exc:  # it expires on its own within the TTL
                log.warning("cannot release the lease of blob %s: %s", fetch.digest, exc)

    async def _announce(self, registry: str, fetch: LeasedFetch, size: int) -> None:
        try:
            await self._leases.announce(registry, fetch.digest, fetch.holder, size)
        except StoreUnavailable as exc:  # a HEAD meanwhile asks the upstream
            log.warning("cannot announce the size of blob %s: %s", fetch.digest, exc)

    async def _renew(self, registry: str, fetch: LeasedFetch) -> None:
        while True:
            await asyncio.sleep(self._leases.ttl / 3)  # a period, not a wait for an event
            try:
                if not await self._leases.renew(registry, fetch.digest, fetch.holder):
                    log.warning("lost the lease of blob %s (it expired): another replica may fetch it", fetch.digest)
                    return
            except StoreUnavailable as exc:
                log.warning("cannot renew the lease of blob %s: %s", fetch.digest, exc)
            raise_if_cancelled()

    async def _follow(self, registry: str, fetch: LeasedFetch, current: Holder, writer: list[TempFile]) -> None:
        """Stream ``current``'s fetch into our temp file from where it is, verify it, finish. Raises PeerMissing or
        PeerGone when the holder's stream is not there or breaks."""
        async with self._peers.stream(
            current.advertise, registry, fetch.digest, current.fetch_id, fetch.written
        ) as body:
            if not writer:
                writer.append(await asyncio.to_thread(self._temp_writer, registry, fetch.digest))
                fetch.begin(body.size, writer[0].temp_path)
                self._metrics.peer_streams_followed.inc()
            elif body.size != fetch.size:
                raise PeerGone(f"the holder's blob has {body.size} bytes, not {fetch.size}")
            await self._receive(body, fetch, writer[0])
        self._verified(fetch, writer[0])

    async def _receive(self, body: PeerBody, fetch: LeasedFetch, writer: TempFile) -> None:
        while writer.written < body.size:
            chunk = await body.content.readany()
            if not chunk:
                raise PeerGone(f"the stream ended at {writer.written} of {body.size} bytes")
            parts, size = [chunk], len(chunk)
            while size < READ and (more := body.content.read_nowait(READ - size)):
                parts.append(more)
                size += len(more)
            if writer.written + size > body.size:
                raise PeerGone("the holder sent more bytes than the blob has")
            await writer.write(chunk if len(parts) == 1 else b"".join(parts))
            fetch.advance(writer.written)

    def _verified(self, fetch: LeasedFetch, writer: TempFile) -> None:
        """Mark the fetch verified if our temp file is the whole blob and matches its digest (our clients get the
        last byte), else fail it (they are cut). It finishes once the object is complete in the bucket."""
        written, hasher = writer.mark()
        if written != fetch.size or hasher.hexdigest() != fetch.digest.hex:
            fetch.fail(lost(fetch.digest, f"sent {written} bytes that do not match the digest"))
            return
        fetch.verify()

    async def _after_stored(self, registry: str, fetch: LeasedFetch, writer: list[TempFile]) -> bool:
        """A fetch stored the object lately: finish with it (the miss path serves it from the bucket, or the rest of
        our temp file comes from it). If it is gone since (removed), the mark goes and the lease is tried again.
        False when the fetch is done."""
        if await self._store.size(fetch.digest) is not None and (
            not writer or fetch.verified or await self._rest_from_bucket(fetch, writer[0])
        ):
            if not fetch.done:
                fetch.finish(self._store.path(fetch.digest))
            return False
        await self._leases.forget_stored(registry, fetch.digest)
        return True

    async def _after_holder(self, fetch: LeasedFetch, writer: list[TempFile]) -> bool:
        """The holder's stream is not there or broke. If the object is complete in the bucket, finish with it: the
        miss path serves it from there if our clients have read nothing, else the rest of our temp file comes from
        it. Otherwise wait a moment before the lease is tried again (a live holder is then followed on with
        ``Range``; a dead one's lease expires within its TTL). False when the fetch is done."""
        if await self._store.size(fetch.digest) is not None and (
            not writer or await self._rest_from_bucket(fetch, writer[0])
        ):
            if not fetch.done:
                fetch.finish(self._store.path(fetch.digest))
            return False
        await asyncio.sleep(self._poll)  # Redis tells nobody when a lease expires: there is no event to await
        return True

    async def _rest_from_bucket(self, fetch: LeasedFetch, writer: TempFile) -> bool:
        """Our temp file completed from the object (verified like any other byte); False if it went meanwhile."""
        try:
            async for chunk in self._store.stream(fetch.digest, writer.written):
                await writer.write(chunk)
                fetch.advance(writer.written)
        except FileNotFoundError:
            return False
        self._verified(fetch, writer)
        return True


def _checked(coordinator: Leased) -> FetchCoordinator:
    return coordinator  # mypy checks Leased against the protocol here
