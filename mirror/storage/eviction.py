"""The eviction policy that keeps the store under ``--cache-size``: least recently *served* content goes first.

Eviction order is the last-served time (a hit refreshes it in memory at once; only the disk write is batched).
Never evicted: content marked local (pushed), pinned images and everything they reference, and digests a client
is reading (leased) or a fetch is writing (still a temp file). This module holds the limits and the plan (pure
functions over the usage table); ``housekeeper.Housekeeper`` runs it and removes the files through the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mirror.storage.entry import Entry
from mirror.storage.gc import Removal


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
