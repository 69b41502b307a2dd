"""The usage table of replicas sharing a bucket (``[cluster]``): ``storage.usage.Usage`` with its on-disk half in
Redis, so that the byte cap counts what every replica stored, eviction orders the whole cluster's content by when
any replica last served it, and pins and per-repository counts are the cluster's.

Keys (``storage.cluster.key``, all under ``mirror:``)::

    mirror:usage:entries      hash    <digest> -> "<size> <last served> <kind> <flags> <repo>" (``Entry``)
    mirror:usage:generation   int     bumped by a command that removed entries (``mirror gc``, ``evict``, ...)
    mirror:usage:journal      int     the number of the last change
    mirror:usage:changes      hash    <n> -> "<writer> <digest> ...": change n touched those entries; the last
                                      ``KEEP`` are kept
    mirror:usage:pins         hash    <image> -> time pinned
    mirror:usage:epoch        string  a token set by the first replica to find it missing: a Redis that lost its
                                      data (restarted without persistence, a failover) has a new one
    mirror:usage:repos        hash    "<registry>/<path>\\t<counter>" -> int

Each replica holds the whole table in memory, as one serving process does, and keeps up with the others as the
processes of one data dir do (``storage.journal``): every write of entries notes their digests in the journal in
the same step (a Lua script: the read, the write and the note are atomic), and every flush reads the changes the
other replicas made since the last one. A hit costs nothing in Redis; a replica's last-served times reach the
others within a flush interval or two.

A Redis that lost its data is noticed at the next flush (a new epoch): each replica writes back the entries it
holds that Redis no longer has (none of them overwriting another's), then reloads the table, so the byte cap and the
LRU order survive; pins and counts written since the last persistence of Redis are lost with it.

Every method blocks (the link's synchronous client): the base class runs them in threads. A Redis that cannot be
reached is ``StoreUnavailable``; the housekeeper logs it and tries again at its next round, keeping the touches
it could not write.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from redis.exceptions import RedisError

from mirror.oci.reference import Digest
from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink, key
from mirror.storage.entry import LOCAL, Entry
from mirror.storage.usage import Usage

log = logging.getLogger(__name__)
ENTRIES, GENERATION = key("usage", "entries"), key("usage", "generation")
JOURNAL, CHANGES = key("usage", "journal"), key("usage", "changes")
PINS, REPOS, EPOCH = key("usage", "pins"), key("usage", "repos"), key("usage", "epoch")
KEEP = 10_000  # changes kept: a replica further behind than this reloads the whole table
BATCH = 1000  # entries per script call or HMGET: Redis runs one script at a time, each call stays short
PAGE = 1000  # entries per HSCAN step of a load

# Shared by the scripts. KEYS: entries, journal, changes. ARGV[1]: the writer, ARGV[2]: KEEP; the rest is the
# script's own. ``note`` appends one change naming the digests written, and drops the one KEEP before it.
_PRELUDE = """
local function note(changed)
  if #changed == 0 then return end
  local n = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[3], n, ARGV[1] .. ' ' .. table.concat(changed, ' '))
  redis.call('HDEL', KEYS[3], n - tonumber(ARGV[2]))
end
local function parse(row)
  local size, last, kind, flags, repo = string.match(row, '^(%S+) (%S+) (%S+) (%S+) ?(.*)$')
  return size, last, kind, tonumber(flags), repo
end
local function row(size, last, kind, flags, repo)
  return size .. ' ' .. last .. ' ' .. kind .. ' ' .. flags .. ' ' .. repo
end
"""
# ARGV[3..8]: digest, size, time, kind, local (0/1), repo. Keeps an earlier entry's pushed mark and repository.
_ADD = """
local k, flags, repo = ARGV[3], tonumber(ARGV[7]), ARGV[8]
local old = redis.call('HGET', KEYS[1], k)
if old then
  local _, _, _, oflags, orepo = parse(old)
  if oflags % 2 == 1 then flags = 1 end
  if repo == '' then repo = orepo end
end
local new = row(ARGV[4], ARGV[5], ARGV[6], flags, repo)
redis.call('HSET', KEYS[1], k, new)
note({k})
return new
"""
# ARGV[3]: the mark wanted (0/1); ARGV[4..]: digests. Entries that have it already are left alone.
_MARK = """
local want, changed = tonumber(ARGV[3]), {}
for i = 4, #ARGV do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    local size, last, kind, flags, repo = parse(old)
    local is = flags % 2
    if is ~= want then
      redis.call('HSET', KEYS[1], ARGV[i], row(size, last, kind, flags - is + want, repo))
      changed[#changed + 1] = ARGV[i]
    end
  end
end
note(changed)
"""
# ARGV[3..]: digest, time served, ... Later times win; returns the digests that have no entry (removed).
_FLUSH = """
local changed, gone = {}, {}
for i = 3, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if not old then
    gone[#gone + 1] = ARGV[i]
  else
    local size, last, kind, flags, repo = parse(old)
    if tonumber(ARGV[i + 1]) > tonumber(last) then
      redis.call('HSET', KEYS[1], ARGV[i], row(size, ARGV[i + 1], kind, flags, repo))
      changed[#changed + 1] = ARGV[i]
    end
  end
end
note(changed)
return gone
"""
# ARGV[3]: 1 to write only digests that have no entry, 0 for all; ARGV[4..]: digest, row, ...
_PUT = """
local changed, missing_only = {}, ARGV[3] == '1'
for i = 4, #ARGV, 2 do
  if not missing_only or redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    if not missing_only then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    changed[#changed + 1] = ARGV[i]
  end
end
note(changed)
"""
# ARGV[3]: 1 to delete only entries served at or before the time given with each, 0 for all; ARGV[4..]: digest,
# time, ...
_DELETE = """
local changed, only_older = {}, ARGV[3] == '1'
for i = 4, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    local _, last = parse(old)
    if not only_older or tonumber(last) <= tonumber(ARGV[i + 1]) then
      redis.call('HDEL', KEYS[1], ARGV[i])
      changed[#changed + 1] = ARGV[i]
    end
  end
end
note(changed)
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _row(entry: Entry) -> str:
    return f"{entry.size} {entry.last_served!r} {entry.kind} {LOCAL if entry.local else 0} {entry.repo}"


def _entry(raw: bytes | str | None) -> Entry | None:
    if raw is None:
        return None
    parts = _text(raw).split(" ", 4)
    if len(parts) != 5:
        return None
    try:
        return Entry(int(parts[0]), float(parts[1]), parts[2], bool(int(parts[3]) & LOCAL), parts[4])
    except ValueError:
        return None


def _batches(items: list[Any], size: int = BATCH) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def _reached() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"the cluster's Redis cannot be reached or failed: {exc}") from exc


class RedisUsage(Usage):
    """The usage table in the replicas' Redis. The link is the app's: ``close`` leaves it open."""

    def __init__(self, link: RedisLink, clock: Callable[[], float] = time.time):
        self._link = link
        self.writer = f"{os.getpid()}-{secrets.token_hex(4)}"  # this process's name in the journal
        self._epoch = b""  # the epoch of the Redis the table was loaded from
        self._read = False  # the table was read from Redis (``may_hold`` trusts it)
        sync = link.sync
        self._add, self._mark, self._flush, self._put, self._delete = (
            sync.register_script(_PRELUDE + body) for body in (_ADD, _MARK, _FLUSH, _PUT, _DELETE)
        )
        self._start(clock, shared=True)

    def close(self) -> None:
        return None

    def may_hold(self, digest: Digest) -> bool:
        """False when the table, once read from Redis, has no entry of ``digest``: every replica records what it
        stores at once and reads the others' records at every flush, so the cluster stored no ``digest`` until a
        flush interval ago. A miss then goes straight to the fetch's coordination, which looks at the bucket again
        before it asks the upstream (``BlobPuller._fetch``): a blob stored meanwhile is served, never fetched twice.
        It saves a miss the bucket round trip of a HEAD."""
        return not self._read or str(digest) in self.table

    def install(self, table: dict[str, Entry], generation: int, loaded_at: float = 0.0) -> None:
        super().install(table, generation, loaded_at)
        self._read = generation >= 0  # -1: started while Redis was down, nothing read yet

    def _write(self, script: Any, args: Iterable[object]) -> Any:
        """Run one of the scripts that write entries (and note them in the journal)."""
        with _reached():
            return script(keys=[ENTRIES, JOURNAL, CHANGES], args=[self.writer, KEEP, *args])

    # --- entries ---------------------------------------------------------------------------------------------
    def added_sync(self, digest: Digest, size: int, kind: str, repo: str = "", local: bool = False) -> Entry:
        raw = self._write(self._add, [str(digest), size, repr(self.now()), kind, int(local), repo])
        entry = _entry(raw)
        assert entry is not None, raw
        return entry

    def mark_local_sync(self, keys: Iterable[str], local: bool = True) -> None:
        for batch in _batches(list(keys)):
            self._write(self._mark, [int(local), *batch])

    def flush_sync(self, dirty: Mapping[str, float]) -> list[str]:
        gone: list[str] = []
        for batch in _batches(list(dirty.items())):
            found = self._write(self._flush, [part for key, served in batch for part in (key, repr(served))])
            gone.extend(_text(key) for key in found)
        return gone

    def put_many_sync(self, entries: Mapping[str, Entry], missing_only: bool = False) -> None:
        for batch in _batches(list(entries.items())):
            parts = [part for key, entry in batch for part in (key, _row(entry))]
            self._write(self._put, [int(missing_only), *parts])

    def delete_sync(self, keys: Iterable[str]) -> None:
        for batch in _batches(list(keys)):
            self._write(self._delete, ["0", *(part for key in batch for part in (key, "0"))])

    def delete_unless_newer_sync(self, items: Iterable[tuple[str, float]]) -> None:
        for batch in _batches(list(items)):
            self._write(self._delete, ["1", *(part for key, served in batch for part in (key, repr(served)))])

    def load_sync(self) -> tuple[dict[str, Entry], int]:
        """Every entry, and the generation read before them. The journal's position is read before the walk too,
        so a change made during it is taken in again by the next ``changes_sync``."""
        with _reached():
            generation, last, self._epoch = self._positions()
            self._journal_loaded = int(last or 0)
            table = {}
            for name, raw in self._link.sync.hscan_iter(ENTRIES, count=PAGE):
                entry = _entry(raw)
                if entry is not None:
                    table[_text(name)] = entry
        return table, int(generation or 0)

    def generation_sync(self) -> int:
        with _reached():
            return int(self._link.sync.get(GENERATION) or 0)

    def bump_generation_sync(self) -> int:
        with _reached():
            return int(self._link.sync.incr(GENERATION))

    # --- the journal -----------------------------------------------------------------------------------------
    def journal_last_sync(self) -> int:
        with _reached():
            return int(self._link.sync.get(JOURNAL) or 0)

    def _positions(self) -> tuple[int, int, bytes]:
        """The generation, the journal's last change and the epoch (set now if Redis has none), read together."""
        with self._link.sync.pipeline(transaction=True) as pipe:
            pipe.set(EPOCH, secrets.token_hex(8), nx=True)
            pipe.get(GENERATION)
            pipe.get(JOURNAL)
            pipe.get(EPOCH)
            _, generation, last, epoch = pipe.execute()
        return int(generation or 0), int(last or 0), bytes(epoch)

    def changes_sync(self, since: int) -> tuple[int, dict[str, Entry | None]] | None:
        with _reached():
            _, last, epoch = self._positions()
        if epoch != self._epoch:  # Redis lost its data: give it back what this replica knows, then reload
            log.warning(
                "the cluster's Redis lost the usage table: writing back the %d entries held here", len(self.table)
            )
            self.put_many_sync(self.table.copy(), missing_only=True)  # a copy in one step (the loop changes it)
            return None
        if since < last - KEEP:
            return None
        keys: set[str] = set()
        with _reached():
            for numbers in _batches(list(range(since + 1, last + 1))):
                for noted in self._link.sync.hmget(CHANGES, numbers):
                    if noted is None:
                        return None  # dropped while being read: this replica fell behind the journal
                    writer, *digests = _text(noted).split(" ")
                    if writer != self.writer:
                        keys.update(digests)
            changed: dict[str, Entry | None] = {}
            for batch in _batches(sorted(keys)):
                for name, raw in zip(batch, self._link.sync.hmget(ENTRIES, batch), strict=True):
                    changed[name] = _entry(raw)
        return last, changed

    # --- pins and per-repository counters ---------------------------------------------------------------------
    def pin_sync(self, image: str) -> bool:
        with _reached():
            return bool(self._link.sync.hsetnx(PINS, image, repr(self._clock())))

    def unpin_sync(self, image: str) -> bool:
        with _reached():
            return bool(self._link.sync.hdel(PINS, image))

    def pins_sync(self) -> dict[str, float]:
        with _reached():
            return {_text(image): float(at) for image, at in self._link.sync.hgetall(PINS).items()}

    def add_repo_counts_sync(self, deltas: Mapping[tuple[str, str], int]) -> None:
        with self._repo_counts_lock, _reached():
            with self._link.sync.pipeline(transaction=True) as pipe:
                for (repo, counter), value in deltas.items():
                    if value:
                        pipe.hincrby(REPOS, f"{repo}\t{counter}", value)
                pipe.execute()
            if self._repo_counts is not None:
                for (repo, counter), value in deltas.items():
                    row = self._repo_counts.setdefault(repo, {})
                    row[counter] = row.get(counter, 0) + value

    def repo_counts_sync(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        with _reached():
            for name, value in self._link.sync.hscan_iter(REPOS, count=PAGE):
                repo, _, counter = _text(name).partition("\t")
                counts.setdefault(repo, {})[counter] = int(value)
        return counts
