"""Keeping the store under ``--cache-size``: least recently *served* content goes first.

The ``Housekeeper`` is the serving process's one background task for the store. It

- loads the usage table at start-up (after ``gc.reconcile_sync`` made it match the disk),
- every ``flush_interval`` writes the batched last-served times and per-repository counts to diskcache, and
  reloads the table when another process (``mirror gc``, ``evict``, ``verify``, ``prefetch``) changed it,
- evicts when the cache plus the fetches under way pass the high watermark, down to the low watermark.

Eviction order is the last-served time (a hit refreshes it in memory at once; only the disk write is batched).
Never evicted: content marked local (pushed), pinned images and everything they reference, and digests a client
is reading (leased) or a fetch is writing (still a temp file). Planning (sorting, resolving pins) runs in a
thread; the unlinks run on the event loop in small batches, each checked against the leases at that moment, so
a request that took a lease can never lose its file. It never blocks a request: requests do not wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from mirror.oci.reference import Digest
from mirror.storage.blobs import BlobStore
from mirror.storage.gc import Removal, Report, protected_sync
from mirror.storage.index import Index
from mirror.storage.usage import Entry, Usage

log = logging.getLogger(__name__)
UNLINK_BATCH = 64  # unlinks between two yields to the event loop
PROTECTED_EVERY = 60.0  # seconds between recomputations of what pins and pushes protect, for the gauge


@dataclass(frozen=True, slots=True)
class Limits:
    size: int = 0  # bytes; 0 = no limit, never evict
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    flush_interval: float = 10.0
    pins: tuple[str, ...] = ()  # from the config file, besides ``mirror pin``
    # Content served this recently is never evicted. 0 in the server (its leases protect what is being read);
    # a CLI process cannot see the server's leases and sees last-served times up to a flush late, so it waits.
    min_idle: float = 0.0

    @property
    def high(self) -> int:
        return int(self.size * self.high_watermark)

    @property
    def low(self) -> int:
        return int(self.size * self.low_watermark)


def candidates(
    entries: Iterable[tuple[str, Entry]], protected: set[str], idle_since: float = float("inf")
) -> list[tuple[str, Entry, float]]:
    """Evictable entries, least recently served first, with the last-served time seen when planning. Entries
    served after ``idle_since`` are not candidates."""
    found = [
        (key, e, e.last_served)
        for key, e in entries
        if not e.local and key not in protected and e.last_served <= idle_since
    ]
    found.sort(key=lambda item: item[2])
    return found


def plan(
    entries: Iterable[tuple[str, Entry]],
    used: int,
    target: int,
    protected: set[str],
    idle_since: float = float("inf"),
) -> list[Removal]:
    """What an eviction down to ``target`` bytes would remove, in order (``mirror evict --dry-run``)."""
    chosen = []
    for key, entry, served in candidates(entries, protected, idle_since):
        if used <= target:
            break
        chosen.append(Removal(key, entry.size, entry.kind, "evicted", served))
        used -= entry.size
    return chosen


async def _nothing() -> None:
    return None


class Housekeeper:
    def __init__(
        self,
        store: BlobStore,
        index: Index,
        usage: Usage,
        limits: Limits,
        busy: Callable[[str], bool] = lambda key: False,
        on_evict: Callable[[str, int], None] = lambda kind, size: None,
        drain_counts: Callable[[], Mapping[tuple[str, str], int]] = dict,
    ):
        self._store = store
        self._index = index
        self._usage = usage
        self.limits = limits
        self._busy = busy
        self._on_evict = on_evict
        self._drain_counts = drain_counts
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
            loaded = await asyncio.to_thread(self._usage.load_sync)
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

        def write() -> tuple[list[str], int]:
            gone = self._usage.flush_sync(dirty) if dirty else []
            if counts:
                self._usage.add_repo_counts_sync(counts)
            return gone, self._usage.generation_sync()

        gone, generation = await asyncio.to_thread(write)
        if generation != self._usage.generation:
            await self.reload()
        else:
            for key in gone:
                if key in self._usage.table and self._store.size_sync(Digest.parse(key)) is None:
                    self._usage.forget(key)
        if time.monotonic() - self._protected_at > PROTECTED_EVERY:
            await self.protected()  # keeps mirror_cache_protected_bytes current (pins may change from the CLI)

    async def reload(self) -> None:
        async with self._lock:
            loaded_at = self._usage.now()
            table, generation = await asyncio.to_thread(self._usage.load_sync)
            self._usage.install(table, generation, loaded_at)
            log.info("usage table reloaded: %d entries, %d bytes", len(table), self._usage.total)

    # --- eviction ------------------------------------------------------------------------------------------
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
        async with self._lock:
            if self._usage.used() > target:
                await self.reclaim()
            protected = await self.protected()
            order = await asyncio.to_thread(candidates, list(self._usage.table.items()), protected, self._idle_since())
            started = time.monotonic()
            for n, (key, entry, served) in enumerate(order):
                if self._usage.used() <= target:
                    break
                if self._busy(key) or entry.last_served != served or self._usage.table.get(key) is not entry:
                    continue  # being read, served since planning, or replaced
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._store.path(Digest.parse(key)))
                self._usage.forget(key)
                report.removed.append(Removal(key, entry.size, entry.kind, "evicted", served))
                self._on_evict(entry.kind, entry.size)
                if n % UNLINK_BATCH == UNLINK_BATCH - 1:
                    await asyncio.sleep(0)
            if report.removed:
                self.evictions += 1
                await asyncio.to_thread(self._forget_sync, report.removed)
                log.info(
                    "evicted %d entries (%d bytes) in %.2fs; cache now %d of %d bytes",
                    len(report.removed),
                    report.bytes,
                    time.monotonic() - started,
                    self._usage.total,
                    self.limits.size,
                )
            elif self._usage.used() > target:
                log.warning(
                    "cache is %d bytes, over its target of %d, and nothing more may be evicted (pinned, pushed or "
                    "in use)",
                    self._usage.used(),
                    target,
                )
        return report

    def _idle_since(self) -> float:
        return self._usage.now() - self.limits.min_idle if self.limits.min_idle > 0 else float("inf")

    def _forget_sync(self, removed: list[Removal]) -> None:
        # Conditional: a digest fetched again since it was unlinked keeps its new entry and manifest record.
        self._usage.delete_unless_newer_sync([(r.digest, r.last_served) for r in removed])
        for r in removed:
            digest = Digest.parse(r.digest)
            if r.kind == "manifest" and self._store.size_sync(digest) is None:
                self._index.delete_manifest_sync(digest)
