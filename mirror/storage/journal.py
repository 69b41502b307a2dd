"""The journal of the usage table's changes, for serving processes that share one data dir (``storage.usage``).

Keys, in the usage table's diskcache::

    ("journal",)          -> int, the number of the last change
    ("journal", <n>)      -> ("<writer>", ("<digest>", ...)): change n (one write: an add, a flush, a removal)
                             touched those digests' entries; writer: the process that made it

``note`` runs inside the transaction of the write it describes, so a change is in the journal exactly when the
entries are on disk; it costs three diskcache operations whatever the number of digests (the new change, the
counter, and removing the change ``KEEP`` before it). A reader keeps the number of the last change it took in
and asks for what came after: two reads per change and one per digest, nothing per entry of the table.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable

import diskcache

KEEP = 10_000  # changes kept: a process further behind than this reloads the whole table


class Journal:
    def __init__(self, cache: diskcache.Cache):
        self._cache = cache
        self.writer = f"{os.getpid()}-{secrets.token_hex(4)}"  # this process's name in the journal

    def note(self, keys: Iterable[str]) -> None:
        """Append one change naming the digests a write changed (inside its transaction); drop the oldest."""
        keys = tuple(keys)
        if not keys:
            return
        last = int(self._cache.incr(("journal",), 1, default=0))
        self._cache.set(("journal", last), (self.writer, keys))
        self._cache.delete(("journal", last - KEEP))

    def last_sync(self) -> int:
        value = self._cache.get(("journal",), 0)
        return int(value) if isinstance(value, int) else 0

    def since_sync(self, since: int) -> tuple[int, set[str]] | None:
        """(the last change, the digests other processes changed after change ``since``); None when the journal
        no longer reaches back that far."""
        last = self.last_sync()
        if since < last - KEEP:
            return None
        changed: set[str] = set()
        for n in range(since + 1, last + 1):
            noted = self._cache.get(("journal", n))
            if isinstance(noted, tuple) and len(noted) == 2 and noted[0] != self.writer:
                changed.update(str(key) for key in noted[1])
        return last, changed
