"""What the store holds and how it is used: size, kind and last-served time of every stored digest, pins, and
per-repository counts. Eviction and ``mirror stats``/``ls`` read it; ``gc.reconcile`` rebuilds it from the disk.

Keys in ``<data-dir>/usage`` (diskcache, SQLite underneath; safe to share between processes)::

    ("entry", "<digest>")              -> (size, last_served, kind, flags, repo)
                                          kind: "blob" | "manifest"; flags: LOCAL (pushed here, never evicted)
                                          repo: "<registry>/<path>" that first brought it, "" when unknown
    ("pins",)                          -> {image: time pinned}, images normalized ("docker.io/library/alpine:3.19",
                                          "docker.io/library/alpine@sha256:...")
    ("repo", "<registry>/<path>", "<counter>") -> int, added to with ``incr`` (hit, miss, bytes_cache, ...)
    ("generation",)                    -> int, bumped by every process that removes entries
    ("journal", ...)                   -> the changes, for processes sharing the data dir (``storage.journal``)

The serving process holds the whole table in memory (``load_sync``): a hit sets a timestamp in a dict and marks
the digest dirty; the housekeeper writes dirty timestamps in one transaction every ``flush_interval`` seconds, so
the hot path never writes to disk. Content added by a fetch is written at once (fetches are rare next to hits).
Other processes (``mirror gc``, ``evict``, ``verify``, ``prefetch``) work on the diskcache directly and bump
``generation`` when they are done; the serving process then reloads its table.

Several serving processes on one data dir (``shared``) each hold the table too. Every write of an entry (an add,
a flushed last-served time, a pushed mark, a removal) then also notes the digests in a journal in the same
transaction (three diskcache operations per write), and each process reads the journal from where it left off at
every flush (``changes_sync``, then ``apply``): another process's adds, removals and touches reach it within one
flush interval, at a cost of about one read per change and one per digest changed, nothing per entry of the
table. The journal (``storage.journal``) keeps the last changes; a process that fell further behind reloads the
whole table.

In-memory state is touched only from the event loop (or, for a CLI command, its one thread); disk methods end
in ``_sync`` and run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import diskcache

from mirror.oci.reference import Digest
from mirror.storage.base import StoreUnavailable
from mirror.storage.entry import KINDS, Entry
from mirror.storage.journal import Journal
from mirror.storage.sqlfull import disk_full


class Usage:
    """The usage table: in memory for the serving process, on disk for everyone. See the module docstring."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time, shared: bool = False):
        self._cache = diskcache.Cache(str(data_dir / "usage"), size_limit=2**40, eviction_policy="none")
        self._journal_log = Journal(self._cache) if shared else None
        self._start(clock, shared)

    def _start(self, clock: Callable[[], float], shared: bool) -> None:
        """The in-memory half, whatever holds the table underneath (``redisusage.RedisUsage``: the replicas')."""
        self.shared = shared  # other serving processes hold this table too: journal every change
        self.journal_seen = 0  # the last change of the journal that ``table`` reflects
        self._journal_loaded = 0  # the journal's last change when ``load_sync`` began
        self._clock = clock
        self._last_time = 0.0
        self.table: dict[str, Entry] = {}
        self.total = 0  # bytes of every entry in ``table``; shared layers count once (one entry per digest)
        self.pending = 0  # bytes of fetches under way (announced Content-Length), not yet in ``total``
        # Push upload sessions (``storage.sessions``): their bytes are on the same disk, so they count against the
        # cache's size as well (eviction makes room for them; they are not entries and are never evicted as such).
        self.upload_sessions = 0
        self.upload_bytes = 0
        self._dirty: dict[str, float] = {}
        self._leases: Counter[str] = Counter()
        self.on_grow: Callable[[], None] = lambda: None  # the housekeeper's wake-up call
        self.on_pending: Callable[[int], None] = lambda pending: None  # ``pending`` changed (a host-wide gauge)
        self.generation = 0  # the disk generation ``table`` was loaded at
        # The per-repository counters as last read, kept current by this process's own additions (the web page's
        # overview asks for them on every load; walking the table each time is O(entries)). Dropped on a reload.
        self._repo_counts: dict[str, dict[str, int]] | None = None
        self._repo_counts_lock = threading.Lock()  # its readers and writers run in threads

    def close(self) -> None:
        self._cache.close()

    def now(self) -> float:
        """The clock, strictly increasing: two events never share a time, so recency order is total."""
        self._last_time = max(self._clock(), self._last_time + 1e-6)
        return self._last_time

    # --- the hot path (event loop, memory only) ----------------------------------------------------------------
    def touch(self, digest: Digest) -> None:
        """A client was served ``digest``: it becomes the most recently used. Written to disk by ``flush``."""
        key = str(digest)
        now = self.now()
        entry = self.table.get(key)
        if entry is not None:
            entry.last_served = now
        self._dirty[key] = now

    def may_hold(self, digest: Digest) -> bool:
        """Whether the store may hold ``digest``: always, here (a look at the disk costs a stat)."""
        return True

    def hold(self, digest: Digest) -> Callable[[], None]:
        """Hold ``digest`` while a client reads it (eviction skips held digests); returns the release, which
        may be called any number of times."""
        key = str(digest)
        self._leases[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._leases[key] -= 1
                if self._leases[key] <= 0:
                    del self._leases[key]

        return release

    @contextlib.contextmanager
    def lease(self, digest: Digest) -> Iterator[None]:
        release = self.hold(digest)
        try:
            yield
        finally:
            release()

    def busy(self, key: str) -> bool:
        return self._leases.get(key, 0) > 0

    def expect(self, size: int | None) -> None:
        """A fetch of ``size`` bytes started (positive) or ended (negative): eviction makes room ahead of it."""
        if size:
            self.pending = max(0, self.pending + size)
            self.on_pending(self.pending)
            if size > 0:
                self.on_grow()

    def remember(self, key: str, entry: Entry) -> None:
        old = self.table.get(key)
        if old is not None:
            self.total -= old.size
            entry.local = entry.local or old.local
            entry.repo = entry.repo or old.repo
        self.table[key] = entry
        self.total += entry.size

    def forget(self, key: str) -> Entry | None:
        entry = self.table.pop(key, None)
        if entry is not None:
            self.total -= entry.size
        return entry

    def uploads_held(self, sessions: int, size: int) -> None:
        """What the upload sessions hold now (``UploadSessions.on_held``); growth may call for an eviction."""
        grew = size > self.upload_bytes
        self.upload_sessions, self.upload_bytes = sessions, size
        if grew:
            self.on_grow()

    def used(self) -> int:
        return self.total + self.pending + self.upload_bytes

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for entry in self.table.values():
            counts[entry.kind] = counts.get(entry.kind, 0) + 1
        return counts

    # --- additions (memory at once, disk in a thread) --------------------------------------------------------
    @disk_full
    def added_sync(self, digest: Digest, size: int, kind: str, repo: str = "", local: bool = False) -> Entry:
        """Record newly stored content on disk; returns the entry to ``remember`` in memory."""
        key = str(digest)
        with self._cache.transact():
            old = Entry.from_row(self._cache.get(("entry", key)))
            entry = Entry(size, self.now(), kind, local or bool(old and old.local), repo or (old.repo if old else ""))
            self._cache.set(("entry", key), entry.row())
            self._journal([key])
        return entry

    async def added(self, digest: Digest, size: int, kind: str, repo: str = "", local: bool = False) -> None:
        """Content was committed to the store (a fetch, a push): count it and make it the most recent. It is in
        this process's table even if the replicas' Redis cannot be written: this replica still serves what it
        stored (``may_hold`` says so)."""
        try:
            entry = await asyncio.to_thread(self.added_sync, digest, size, kind, repo, local)
        except StoreUnavailable:
            self.remember(str(digest), Entry(size, self.now(), kind, local, repo))
            self.on_grow()
            raise
        self.remember(str(digest), entry)
        self.on_grow()

    async def mark_local(self, digests: Iterable[Digest], local: bool = True) -> None:
        """Mark stored content pushed (never evicted) or, with ``local=False``, no longer pushed. The local
        registry records pushed content with ``added(..., local=True)`` and calls this with ``local=False`` when
        no local repository holds a digest any more."""
        keys = [str(d) for d in digests]
        await asyncio.to_thread(self.mark_local_sync, keys, local)
        for key in keys:
            if key in self.table:
                self.table[key].local = local

    @disk_full
    def mark_local_sync(self, keys: Iterable[str], local: bool = True) -> None:
        with self._cache.transact():
            changed = []
            for key in keys:
                entry = Entry.from_row(self._cache.get(("entry", key)))
                if entry is not None and entry.local != local:
                    entry.local = local
                    self._cache.set(("entry", key), entry.row())
                    changed.append(key)
            self._journal(changed)

    # --- batched writes and reloads (the housekeeper) --------------------------------------------------------
    def take_dirty(self) -> dict[str, float]:
        dirty, self._dirty = self._dirty, {}
        return dirty

    def keep_dirty(self, dirty: Mapping[str, float]) -> None:
        """Touches taken by ``take_dirty`` that could not be written: written with the next flush."""
        for key, served in dirty.items():
            if served > self._dirty.get(key, 0.0):
                self._dirty[key] = served

    def flush_sync(self, dirty: Mapping[str, float]) -> list[str]:
        """Write last-served times of existing entries; return the digests whose entry another process removed."""
        gone = []
        with self._cache.transact():
            changed = []
            for key, served in dirty.items():
                entry = Entry.from_row(self._cache.get(("entry", key)))
                if entry is None:
                    gone.append(key)
                elif served > entry.last_served:
                    entry.last_served = served
                    self._cache.set(("entry", key), entry.row())
                    changed.append(key)
            self._journal(changed)
        return gone

    def load_sync(self) -> tuple[dict[str, Entry], int]:
        """Every entry on disk and the generation read before them."""
        generation = self.generation_sync()
        self._journal_loaded = self.journal_last_sync()
        table = {}
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and len(key) == 2 and key[0] == "entry":
                entry = Entry.from_row(self._cache.get(key))
                if entry is not None:
                    table[key[1]] = entry
        return table, generation

    def install(self, table: dict[str, Entry], generation: int, loaded_at: float = 0.0) -> None:
        """Swap in a table loaded from disk (event loop), keeping touches made since and entries added or served
        after ``loaded_at`` (the load may have missed them)."""
        if loaded_at:
            for key, entry in self.table.items():
                if key not in table and entry.last_served > loaded_at:
                    table[key] = entry
        for key, served in self._dirty.items():
            found = table.get(key)
            if found is not None and served > found.last_served:
                found.last_served = served
        self.table = table
        self.total = sum(e.size for e in table.values())
        self.generation = generation
        with self._repo_counts_lock:
            self._repo_counts = None  # another process may have counted too
        self.journal_seen = self._journal_loaded

    def generation_sync(self) -> int:
        value = self._cache.get(("generation",), 0)
        return int(value) if isinstance(value, int) else 0

    def bump_generation_sync(self) -> int:
        return int(self._cache.incr(("generation",), 1, default=0))

    # --- the journal of processes sharing the data dir --------------------------------------------------------
    def _journal(self, keys: Iterable[str]) -> None:
        """Inside a write's transaction: note the entries it changed, for the other serving processes."""
        if self._journal_log is not None:
            self._journal_log.note(keys)

    def journal_last_sync(self) -> int:
        return self._journal_log.last_sync() if self._journal_log is not None else 0

    def changes_sync(self, since: int) -> tuple[int, dict[str, Entry | None]] | None:
        """The entries other processes changed after change ``since``, as they are on disk now (None: removed),
        with the last change read; None when the journal no longer reaches back that far (reload the table)."""
        if self._journal_log is None:
            return since, {}
        found = self._journal_log.since_sync(since)
        if found is None:
            return None
        last, keys = found
        return last, {key: Entry.from_row(self._cache.get(("entry", key))) for key in keys}

    def apply(self, last: int, changed: Mapping[str, Entry | None], read_at: float) -> None:
        """Take in another process's changes (event loop). ``read_at``: when ``changes_sync`` began; an entry
        this process added or served after it is kept as it is here."""
        for key, entry in changed.items():
            mine = self.table.get(key)
            if entry is None:
                if mine is not None and mine.last_served <= read_at:
                    self.forget(key)
                continue
            if mine is not None:
                if mine.row() == entry.row():
                    continue
                entry.last_served = max(entry.last_served, mine.last_served)
                self.total -= mine.size
            self.table[key] = entry
            self.total += entry.size
        self.journal_seen = max(self.journal_seen, last)

    # --- direct disk access (CLI commands, gc, reconcile) ----------------------------------------------------
    def entries_sync(self) -> dict[str, Entry]:
        return self.load_sync()[0]

    def put_sync(self, key: str, entry: Entry) -> None:
        self.put_many_sync({key: entry})

    def put_many_sync(self, entries: Mapping[str, Entry]) -> None:
        with self._cache.transact():
            for key, entry in entries.items():
                self._cache.set(("entry", key), entry.row())
            self._journal(entries)

    def delete_sync(self, keys: Iterable[str]) -> None:
        with self._cache.transact():
            keys = list(keys)
            for key in keys:
                self._cache.delete(("entry", key))
            self._journal(keys)

    def delete_unless_newer_sync(self, items: Iterable[tuple[str, float]]) -> None:
        """Delete entries unless they were stored or served after the given time (added again meanwhile)."""
        with self._cache.transact():
            deleted = []
            for key, served in items:
                entry = Entry.from_row(self._cache.get(("entry", key)))
                if entry is not None and entry.last_served <= served:
                    self._cache.delete(("entry", key))
                    deleted.append(key)
            self._journal(deleted)

    # --- pins (one key, read-modify-write in a transaction: few, and read by every eviction) --------------------
    def pin_sync(self, image: str) -> bool:
        """Pin a normalized image reference; False if it was pinned already."""
        with self._cache.transact():
            pins = self.pins_sync()
            if image in pins:
                return False
            pins[image] = self._clock()
            self._cache.set(("pins",), pins)
        return True

    def unpin_sync(self, image: str) -> bool:
        with self._cache.transact():
            pins = self.pins_sync()
            if pins.pop(image, None) is None:
                return False
            self._cache.set(("pins",), pins)
        return True

    def pins_sync(self) -> dict[str, float]:
        value = self._cache.get(("pins",), {})
        return dict(value) if isinstance(value, dict) else {}

    # --- per-repository counters ------------------------------------------------------------------------------
    def add_repo_counts_sync(self, deltas: Mapping[tuple[str, str], int]) -> None:
        with self._repo_counts_lock, self._cache.transact():
            for (repo, counter), value in deltas.items():
                if value:
                    self._cache.incr(("repo", repo, counter), value, default=0)
                    if self._repo_counts is not None:
                        row = self._repo_counts.setdefault(repo, {})
                        row[counter] = row.get(counter, 0) + value

    def repo_counts_kept_sync(self) -> dict[str, dict[str, int]]:
        """``repo_counts_sync`` read once and then kept up to date with ``add_repo_counts_sync`` (a copy)."""
        with self._repo_counts_lock:
            if self._repo_counts is None:
                self._repo_counts = self.repo_counts_sync()
            return {repo: dict(counts) for repo, counts in self._repo_counts.items()}

    def repo_counts_sync(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and len(key) == 3 and key[0] == "repo":
                value = self._cache.get(key)
                if isinstance(value, int):
                    counts.setdefault(key[1], {})[key[2]] = value
        return counts
