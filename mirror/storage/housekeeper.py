"""The serving process's one background task for the store: flush, reload, evict.

The ``Housekeeper``

- loads the usage table at start-up (after ``gc.reconcile_sync`` made it match the disk),
- every ``flush_interval`` writes the batched last-served times and per-repository counts to diskcache, and
  reloads the table when another process (``mirror gc``, ``evict``, ``verify``, ``prefetch``) changed it,
- evicts when the cache plus the fetches under way pass the high watermark, down to the low watermark, in the
  order ``eviction.candidates`` gives.

Planning (sorting, resolving pins) runs in a thread. Removal is in two steps so that no file work runs on the
event loop and yet a request that took a lease can never lose its file: on the loop, each candidate is checked
against the leases and, in the same step (no await between), withdrawn from the store (``BlobStorage.withdraw``:
from then on a lookup of it is a miss, so a request that takes a lease afterwards fetches it again); then a
batch of withdrawn digests is unlinked in a thread (``remove_withdrawn``), skipping any that a new fetch
published meanwhile. It never blocks a request: requests do not wait for it.

Processes sharing one data dir (``turn`` given, ``Usage.shared``): each flush also takes in the other processes'
changes from the usage journal, and one process evicts at a time (``evictlock.EvictionLock``, tried without
waiting). The evictor catches up with the journal before planning, so it plans over every process's adds and
last-served times (up to one flush interval late). It cannot see the other processes' leases; it does not need
to: a file another process has open stays readable after the unlink (POSIX), and one looked up but not yet
opened there is a miss when it opens it, fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from mirror.oci.reference import Digest
from mirror.storage.base import BlobStorage, MetadataIndex, StoreUnavailable
from mirror.storage.entry import Entry
from mirror.storage.eviction import Limits, candidates, plan
from mirror.storage.evictlock import EvictionTurn
from mirror.storage.gc import Removal, Report, protected_sync
from mirror.storage.usage import Usage

log = logging.getLogger(__name__)
UNLINK_BATCH = 64  # digests withdrawn on the loop, then unlinked in one thread call
PROTECTED_EVERY = 60.0  # seconds between recomputations of what pins and pushes protect, for the gauge


async def _nothing() -> None:
    return None


class Housekeeper:
    def __init__(
        self,
        store: BlobStorage,
        index: MetadataIndex,
        usage: Usage,
        limits: Limits,
        busy: Callable[[str], bool] = lambda key: False,
        on_evict: Callable[[str, int], None] = lambda kind, size: None,
        drain_counts: Callable[[], Mapping[tuple[str, str], int]] = dict,
        turn: EvictionTurn | None = None,
    ):
        self._store = store
        self._index = index
        self._usage = usage
        self.limits = limits
        self._busy = busy
        self._on_evict = on_evict
        self._drain_counts = drain_counts
        self._turn = turn  # sharing the data dir: the lock that makes this process the one evicting
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one eviction or reload at a time
        self.protected_bytes = 0
        self._protected_at = float("-inf")
        self.evictions = 0  # eviction runs that removed something
        self.ready = False
        # Called before an eviction removes content: the composition root makes it drop idle upload sessions.
        self.reclaim: Callable[[], Awaitable[object]] = _nothing

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self, loaded: tuple[dict[str, Entry], int] | None = None) -> None:
        """Install the usage table (as ``gc.reconcile_sync`` just made it, or read now) and start the task."""
        if loaded is None:
            try:
                loaded = await asyncio.to_thread(self._usage.load_sync)
            except StoreUnavailable as exc:  # the replicas' Redis is down: serve unready, read it once it is back
                log.warning("start-up: the usage table could not be read, read at the first flush that can: %s", exc)
                loaded = {}, -1  # no generation is -1: that flush reloads
        table, generation = loaded
        self._usage.install(table, generation)
        self._wake = asyncio.Event()
        self._usage.on_grow = self._grown
        self._task = asyncio.create_task(self._run(), name="housekeeper")
        self.ready = True
        self._grown()

    async def close(self) -> None:
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    def over_limit(self) -> bool:
        return self.limits.size > 0 and self._usage.used() > self.limits.high

    def _grown(self) -> None:
        if self._wake is not None and self.over_limit():
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self.over_limit():  # make room first: a fetch may be waiting on the disk
                    await self.evict()
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("housekeeping failed; retrying in %.0f s", self.limits.flush_interval)

    # --- flush and reload ----------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write batched last-served times and counters; reload the table if another process changed it."""
        dirty = self._usage.take_dirty()
        counts = self._drain_counts()
        # The entries as they are before the files are looked at: one added meanwhile (a commit publishes the file
        # before it adds the entry) is a different object and is not forgotten below.
        known = {key: self._usage.table.get(key) for key in dirty}

        def write() -> tuple[list[str], int]:
            gone = self._usage.flush_sync(dirty) if dirty else []
            if counts:
                self._usage.add_repo_counts_sync(counts)
            missing = [key for key in gone if self._store.size_sync(Digest.parse(key)) is None]
            return missing, self._usage.generation_sync()

        try:
            missing, generation = await asyncio.to_thread(write)
        except Exception:
            self._usage.keep_dirty(dirty)  # the store's metadata cannot be reached (Redis down): next round
            raise
        if generation != self._usage.generation:
            await self.reload()
        else:
            for key in missing:  # removed by another process: their entries went from disk, and go here too
                if known[key] is not None and self._usage.table.get(key) is known[key]:
                    self._usage.forget(key)
            await self.catch_up()
        if time.monotonic() - self._protected_at > PROTECTED_EVERY:
            await self.protected()  # keeps mirror_cache_protected_bytes current (pins may change from the CLI)

    async def reload(self) -> None:
        async with self._lock:
            await self._reload_unlocked()

    async def _reload_unlocked(self) -> None:
        loaded_at = self._usage.now()
        table, generation = await asyncio.to_thread(self._usage.load_sync)
        self._usage.install(table, generation, loaded_at)
        log.info("usage table reloaded: %d entries, %d bytes", len(table), self._usage.total)

    async def catch_up(self, locked: bool = False) -> None:
        """Take in what the other processes sharing the data dir changed since the last time (their journal).
        ``locked``: the caller holds the housekeeper's lock (eviction)."""
        if not self._usage.shared:
            return
        read_at = self._usage.now()
        changes = await asyncio.to_thread(self._usage.changes_sync, self._usage.journal_seen)
        if changes is None:  # fallen behind the journal's start: read everything
            await (self._reload_unlocked() if locked else self.reload())
        else:
            self._usage.apply(*changes, read_at)

    # --- eviction ------------------------------------------------------------------------------------------
    def recent_protected_bytes(self) -> int | None:
        """``protected_bytes`` as the last computation left it (every PROTECTED_EVERY seconds, by ``flush``), or
        None when it is older than that or was marked stale (``protected_changed``)."""
        return self.protected_bytes if time.monotonic() - self._protected_at <= PROTECTED_EVERY else None

    def protected_changed(self) -> None:
        self._protected_at = float("-inf")

    async def protected(self) -> set[str]:
        local = [key for key, entry in self._usage.table.items() if entry.local]
        keys = await asyncio.to_thread(protected_sync, self._store, self._index, self._usage, self.limits.pins, local)
        self.protected_bytes = sum(e.size for k, e in self._usage.table.items() if k in keys)
        self._protected_at = time.monotonic()
        return keys

    async def plan(self, target: int | None = None) -> list[Removal]:
        """What ``evict`` would remove now (the admin API's and ``mirror evict --dry-run``'s answer)."""
        if self.limits.size <= 0 and target is None:
            return []  # no --cache-size: nothing is ever evicted
        protected = await self.protected()
        target = self.limits.low if target is None else target
        # The server's view (no idle wait): a CLI dry run shows what the server's next eviction removes.
        return plan(list(self._usage.table.items()), self._usage.used(), target, protected)

    async def evict(self, target: int | None = None) -> Report:
        """Remove least recently served content until the cache plus fetches under way fit in ``target``
        (default: the low watermark)."""
        report = Report()
        if self.limits.size <= 0 and target is None:
            return report
        target = self.limits.low if target is None else target
        async with self._lock:  # this process's one eviction, then (sharing the data dir) the only one
            if not await self._take_turn():
                log.debug("another process on the data dir is evicting: leaving it to that one")
                return report
            try:
                await self.catch_up(locked=True)  # every process's adds and last-served times, before planning
                await self._evict_locked(target, report)
            finally:
                if self._turn is not None:
                    await asyncio.to_thread(self._turn.release_sync)
        return report

    async def _take_turn(self) -> bool:
        """Alone on the data dir: always. Sharing it: if no other process is evicting (a thread tries the lock;
        if this task is cancelled meanwhile, the lock it got is released)."""
        turn = self._turn
        if turn is None:
            return True
        trying = asyncio.ensure_future(asyncio.to_thread(turn.try_acquire_sync))
        try:
            return await asyncio.shield(trying)
        except asyncio.CancelledError:

            def release_if_taken(done: asyncio.Future[bool]) -> None:
                if not done.cancelled() and done.exception() is None and done.result():
                    turn.release_sync()  # closes one descriptor: instant

            trying.add_done_callback(release_if_taken)
            raise

    async def _evict_locked(self, target: int, report: Report) -> None:
        if self._usage.used() <= target:
            return  # another process evicted meanwhile (seen in the journal)
        await self.reclaim()
        protected = await self.protected()
        order = await asyncio.to_thread(candidates, list(self._usage.table.items()), protected, self._idle_since())
        began, started = time.time(), time.monotonic()
        await self._remove(order, target, report)
        if report.removed:
            self.evictions += 1
            await asyncio.to_thread(self._forget_sync, report.removed)
            log.info(
                "evicted %d entries (%d bytes) in %.2fs (from %.6f to %.6f); cache now %d of %d bytes",
                len(report.removed),
                report.bytes,
                time.monotonic() - started,
                began,
                time.time(),
                self._usage.total,
                self.limits.size,
            )
        elif self._usage.used() > target:
            log.warning(
                "cache is %d bytes, over its target of %d, and nothing more may be evicted (pinned, pushed or in use)",
                self._usage.used(),
                target,
            )

    async def _remove(self, order: list[tuple[str, Entry, float]], target: int, report: Report) -> None:
        """Withdraw candidates on the loop, each checked against the leases at that moment, and unlink them in
        batches in a thread, until the cache plus fetches under way fit in ``target``."""
        batch: list[tuple[str, Entry, float]] = []
        for key, entry, served in order:
            if self._usage.used() - sum(e.size for _, e, _ in batch) <= target:
                break
            if self._busy(key) or entry.last_served != served or self._usage.table.get(key) is not entry:
                continue  # being read, served since planning, or replaced
            self._store.withdraw(Digest.parse(key))  # same step as the lease check: no await in between
            batch.append((key, entry, served))
            if len(batch) >= UNLINK_BATCH:
                await self._unlink(batch, report)
                batch = []
        if batch:
            await self._unlink(batch, report)

    async def _unlink(self, batch: list[tuple[str, Entry, float]], report: Report) -> None:
        removed = set(await self._store.remove_withdrawn(Digest.parse(key) for key, _, _ in batch))
        for key, entry, served in batch:
            if Digest.parse(key) not in removed:
                continue  # fetched and published again meanwhile: the new file and its entry stay
            if self._usage.table.get(key) is entry:
                self._usage.forget(key)
            report.removed.append(Removal(key, entry.size, entry.kind, "evicted", served))
            self._on_evict(entry.kind, entry.size)

    def _idle_since(self) -> float:
        return self._usage.now() - self.limits.min_idle if self.limits.min_idle > 0 else float("inf")

    def _forget_sync(self, removed: list[Removal]) -> None:
        # Conditional: a digest fetched again since it was unlinked keeps its new entry and manifest record.
        self._usage.delete_unless_newer_sync([(r.digest, r.last_served) for r in removed])
        # An entry another process served after the planning (a newer time on disk) was kept by that; its file is
        # gone all the same, so it goes too, or every process would count a blob that is not stored.
        absent = [r for r in removed if self._store.size_sync(Digest.parse(r.digest)) is None]
        if self._usage.shared:
            self._usage.delete_sync(r.digest for r in absent)
        for r in absent:
            if r.kind == "manifest":
                self._index.delete_manifest_sync(Digest.parse(r.digest))
