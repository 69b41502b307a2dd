"""Fetch coordination across processes sharing one data dir: one upstream fetch per (upstream, digest) for the
whole host, by a file lock per key (``storage.fetchlocks``).

Inside a process the in-process single flight (``InFlight``) still runs: however many clients of one process ask,
one task per key coordinates with the other processes. That task:

1. takes the key's lock without waiting; if it got it, it is the **leader**: it runs the fetch (``BlobPuller._fetch``
   writes the temp file named by the key) and, once the upstream answered, announces the size and the temp file in
   the lock file; it releases the lock only after the blob is published or its temp file removed;
2. else it is a **follower**: every ``poll`` seconds it looks at the files (in a thread): the announcement starts
   its ``Fetch`` on the leader's temp file, whose size is how far its clients may read (minus the last byte, as
   for any fetch). The leader marks the announcement verified once the digest matched, before it publishes:
   a follower that sees the mark and every byte in the file lets its clients have the last byte too, as the
   leader's own clients have it (the fsync and rename of a large blob take a second). When the lock comes free,
   the outcome is on disk: the published blob (success, if it is the file it followed), or no blob (the leader
   failed or died).
3. A follower that takes the free lock and finds the temp file it followed still there knows its holder died
   mid-blob (a holder that fails removes its temp file first): it takes the fetch over and continues that file
   with an upstream Range request (``pull.resume``), its clients streaming on where they are and the other
   processes' followers following it as before. One that took the free lock before anything was announced runs
   the fetch itself (from scratch). Otherwise (the file it followed is gone or was not the one published) its
   clients are cut: never a complete wrong body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mirror.oci import errors
from mirror.oci.reference import Digest
from mirror.pull.inflight import Fetch, FetchCoordinator, FetchRun, FetchState, InFlight, RemoteFetch
from mirror.storage.blobs import BlobStore
from mirror.storage.fetchlocks import FetchLock, FetchLocks, Followed

log = logging.getLogger(__name__)
POLL = 0.01  # seconds between looks at a fetch another process runs


class LockedFetch(Fetch):
    """A ``Fetch`` whose ``begin`` is also told to the other processes (``on_begin``) while this one leads."""

    def __init__(self, digest: Digest, repo: str = ""):
        super().__init__(digest, repo)
        self.on_begin: Callable[[int | None], None] | None = None
        self.on_verify: Callable[[], None] | None = None

    def begin(self, size: int | None, temp_path: Path) -> None:
        super().begin(size, temp_path)
        if self.on_begin is not None:
            self.on_begin(size)

    def verify(self) -> None:
        super().verify()
        if self.on_verify is not None:
            self.on_verify()


def lost(digest: Digest, why: str) -> errors.RegistryError:
    return errors.UpstreamUnavailable(f"the fetch of blob {digest} in another process {why}; retry")


class FileLocks:
    """The ``FetchCoordinator`` of processes sharing one data dir. Owned by the app (no module state)."""

    def __init__(self, locks: FetchLocks, poll: float = POLL):
        self._locks = locks
        self._poll = poll
        self._inflight = InFlight(LockedFetch)

    def join(self, registry: str, digest: Digest, run: FetchRun, repo: str = "") -> tuple[FetchState, bool]:
        async def coordinated(fetch: FetchState) -> None:
            assert isinstance(fetch, LockedFetch)  # made by this InFlight
            await self._coordinate(registry, fetch, run)

        return self._inflight.join(registry, digest, coordinated, repo)

    def under_way(self) -> list[tuple[str, FetchState]]:
        """This process's fetches (led or followed): what its clients are streaming."""
        return self._inflight.under_way()

    async def elsewhere(self) -> list[RemoteFetch]:
        """The fetches other processes on the data dir run that this one does not follow (from their locks)."""
        own = {(registry, fetch.digest) for registry, fetch in self._inflight.under_way()}
        held = await asyncio.to_thread(self._locks.held_sync)
        return [
            RemoteFetch(h.registry, h.digest, h.repo, h.size, h.written, h.started)
            for h in held
            if (h.registry, h.digest) not in own
        ]

    def get(self, registry: str, digest: Digest) -> FetchState | None:
        return self._inflight.get(registry, digest)

    def fetching(self, digest: Digest) -> bool:
        return self._inflight.fetching(digest)

    async def announced(self, registry: str, digest: Digest) -> int | None:
        """The size another process's fetch of the key announced (its lock held, its upstream answered)."""
        return await asyncio.to_thread(self._locks.announced_sync, registry, digest)

    async def close(self) -> None:
        await self._inflight.close()

    async def _coordinate(self, registry: str, fetch: LockedFetch, run: FetchRun) -> None:
        lock = await asyncio.to_thread(self._locks.acquire_sync, registry, fetch.digest)
        if lock is not None:
            await self._lead(lock, fetch, run)
            return
        followed: list[Followed] = []
        try:
            lock = await self._follow(registry, fetch, followed)
            try:
                await self._outcome(lock, fetch, followed[0].inode if followed else None, run)
            finally:
                await asyncio.to_thread(lock.release_sync)
        finally:
            for file in followed:
                await asyncio.to_thread(file.close_sync)

    async def _outcome(self, lock: FetchLock, fetch: LockedFetch, inode: int | None, run: FetchRun) -> None:
        """With the lock that the leader let go of: finish with its blob, fetch it here, or fail."""
        published = await asyncio.to_thread(lock.published_sync)
        if published is not None and (inode is None or inode == published.inode):
            if inode is not None:  # else nothing was begun: the miss path serves the stored blob
                fetch.advance(published.size)
            fetch.finish(lock.final_path)
            return
        resumable = published is None and inode is not None and fetch.size is not None
        if resumable and inode is not None and await asyncio.to_thread(lock.left_behind_sync, inode):
            # Its holder died mid-blob, leaving the file our clients read: continue it here.
            log.info("resuming the fetch of blob %s another process left at %d bytes", fetch.digest, fetch.written)
            fetch.resume = True
            await self._lead(lock, fetch, run)
            return
        await asyncio.to_thread(lock.discard_leftover_sync)
        if published is None and inode is None:  # nobody's clients read anything yet: fetch it here
            await self._lead(lock, fetch, run)
            return
        # Our clients read a file that was not published (its fetch failed, or its process died): cut them.
        fetch.fail(lost(fetch.digest, "ended without publishing it"))

    async def _lead(self, lock: FetchLock, fetch: LockedFetch, run: FetchRun) -> None:
        """Run the fetch holding the key; the lock goes only once the blob is published or its file removed."""
        announcing: list[asyncio.Task[None]] = []

        def announce(size: int | None) -> None:
            announcing.append(asyncio.create_task(asyncio.to_thread(lock.announce_sync, size, fetch.repo)))

        def announce_verified() -> None:
            earlier = list(announcing)

            async def after_the_announcement() -> None:
                await asyncio.gather(*earlier, return_exceptions=True)
                await asyncio.to_thread(lock.announce_verified_sync)

            announcing.append(asyncio.create_task(after_the_announcement()))

        fetch.on_begin, fetch.on_verify = announce, announce_verified
        try:
            await run(fetch)
        finally:
            fetch.on_begin = fetch.on_verify = None
            await asyncio.gather(*announcing, return_exceptions=True)
            await asyncio.to_thread(lock.release_sync)

    async def _follow(self, registry: str, fetch: LockedFetch, followed: list[Followed]) -> FetchLock:
        """Follow the fetch another process leads until its lock comes free; the lock (now ours). The temp file
        followed, once announced, is added to ``followed`` (the caller closes it)."""
        while True:
            seen = await asyncio.to_thread(
                self._locks.progress_sync, registry, fetch.digest, followed[0] if followed else None
            )
            if isinstance(seen, FetchLock):
                return seen
            if seen.announced and seen.inode is not None:
                if not followed:
                    file = await asyncio.to_thread(self._locks.follow_sync, registry, fetch.digest, seen.inode)
                    if file is not None:
                        followed.append(file)
                        fetch.begin(seen.size, self._locks.temp_path(registry, fetch.digest))
                elif seen.inode != followed[0].inode:
                    raise lost(fetch.digest, "was started again")
                elif seen.written > fetch.written:
                    fetch.advance(seen.written)
                verified = seen.verified and not fetch.verified and seen.size is not None
                if verified and followed and fetch.written == seen.size:
                    fetch.verify()  # the leader checked exactly these bytes: the last one may go
            await asyncio.sleep(self._poll)  # another process writes: there is no event to await here


if TYPE_CHECKING:  # checked against its protocol by mypy (nothing runs)
    _coordinator: FetchCoordinator = FileLocks(FetchLocks(BlobStore(Path())))
