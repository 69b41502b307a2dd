"""Docker Hub's pull limit as the mirror sees it (``Quota``), optionally shared by the processes on one data dir.

When an answer says fewer than ``threshold`` pulls are left (``ratelimit-remaining: 8;w=21600``), or after a 429,
the upstream is *saving* for ``pause`` seconds (a 429's ``Retry-After`` when it gives one): known tags are then
served from the cache without revalidation, so the pulls that are left go to content the cache does not have.

Every process behind one address shares the upstream's quota (Docker Hub counts per client IP), so processes
sharing a data dir share this state too: a ``QuotaRecord`` (``storage.quotas`` keeps one small file per upstream)
holds the wall-clock ``until`` and the reason. A process writes it when it starts holding back (or stops, when the
window moved on), in a thread, and reads it on the revalidation path only (``check``), just before it would ask
the upstream anyway: a hit never pays for it, and a process alone on its data dir has no record at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class QuotaRecord(Protocol):
    """Where processes sharing a data dir (``storage.quotas``), or replicas (``storage.redisquota``), keep one
    upstream's saving window. Blocking: called in a thread; OSError when the record cannot be reached."""

    def read_sync(self) -> tuple[float, str]:
        """(until, reason): wall-clock end of the window and why; (0.0, "") when there is none."""
        ...

    def write_sync(self, until: float, reason: str) -> None: ...


class Quota:
    """One upstream's saving window, in memory, and with ``shared`` also in a record the other processes read.
    Times are wall-clock, so that processes can compare them."""

    def __init__(
        self,
        threshold: int,
        pause: float,
        clock: Callable[[], float] = time.time,
        shared: QuotaRecord | None = None,
    ):
        self.threshold = threshold
        self.pause = pause
        self._clock = clock
        self._until = 0.0
        self._reason = ""
        self.shared = shared
        self._pending: tuple[float, str] | None = None  # the window to write to ``shared`` next
        self._writer: asyncio.Task[None] | None = None

    def remaining(self, left: float) -> None:
        if left < self.threshold:
            self._hold(self.pause, "low_quota")
        elif self._reason == "low_quota" and self._until > 0:
            self._until = 0.0  # the window moved on: pulls are available again
            self._publish()

    def rate_limited(self, retry_after: str | None) -> None:
        seconds = self.pause
        if retry_after and retry_after.strip().isdigit():
            seconds = float(retry_after)
        self._hold(seconds, "rate_limited")

    def _hold(self, seconds: float, reason: str) -> None:
        if seconds > 0:
            until = max(self._until, self._clock() + seconds)
            changed = (until, reason) != (self._until, self._reason)
            self._until, self._reason = until, reason
            if changed:
                self._publish()

    def saving(self) -> str | None:
        """Why tags should not be revalidated now ("low_quota" or "rate_limited"), or None (this process's view)."""
        return self._reason if self._clock() < self._until else None

    async def check(self) -> str | None:
        """``saving``, with the shared record read first when this process sees no window (it is about to ask
        the upstream: another process may have been told to hold back)."""
        saving = self.saving()
        if saving is not None or self.shared is None:
            return saving
        try:
            until, reason = await asyncio.to_thread(self.shared.read_sync)
        except OSError as exc:
            log.warning("cannot read the shared quota record: %s", exc)
            return None
        if reason and until > self._clock():
            self._until, self._reason = until, reason
        return self.saving()

    # --- the shared record ---------------------------------------------------------------------------------
    def _publish(self) -> None:
        """Write this process's window for the others, in the background (called from the event loop). One
        writer at a time, always writing the latest window: the record never goes back to an older one."""
        if self.shared is None:
            return
        self._pending = (self._until, self._reason)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending(self.shared))

    async def _write_pending(self, shared: QuotaRecord) -> None:
        while self._pending is not None:
            (until, reason), self._pending = self._pending, None
            try:
                await asyncio.to_thread(shared.write_sync, until, reason)
            except OSError as exc:
                log.warning("cannot write the shared quota record: %s", exc)

    async def settle(self) -> None:
        """Wait for the record write under way, if any (at shutdown, and in tests)."""
        if self._writer is not None:
            await self._writer
