"""The webhook queue of replicas (``[cluster]``): one endpoint's events in the replicas' Redis, so each event is sent
once whichever replica the push reached, and what a replica queued is still sent after it stops or dies. It is the
``notify.EventQueue`` that ``notify.MemoryQueue`` is for one process; the sending and its retries stay in
``notify.Notifier``.

Per endpoint (``<h>``: the first 16 hex digits of the SHA-256 of its URL)::

    mirror:webhooks:<h>            list: the events waiting, oldest first (RPUSH, then LTRIM to the bound)
    mirror:webhooks:<h>:sending    list: the event being sent (moved there from the waiting list, LREM once done)
    mirror:webhooks:<h>:lock       redis-py's lock: the one replica sending this endpoint's events

Publishing never waits for Redis: ``put`` appends to a buffer of this process that one task writes out in order (so a
replica's events keep their order in the list), and that keeps them while Redis cannot be reached, bounded like the
list (its oldest dropped first). Each event dropped, from the buffer or from the list, is reported.

One replica at a time sends an endpoint's events, in order: the one holding its lock, renewed every third of ``hold``
seconds while held. The others try to take it every ``poll`` seconds, so when the holder stops (it lets go) or dies
(its lock expires after ``hold`` seconds) another one carries on. The event being sent stays in the ``sending`` list
until it is sent or given up on, and a replica that takes over sends it first. So every event is sent exactly once,
except the one in flight when its sender stopped, died or lost its lock (Redis out of reach past ``hold``): that one
is sent at least once, and may be sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Callable

from redis.exceptions import LockNotOwnedError, RedisError

from mirror.storage.cluster import RedisLink, key, raise_if_cancelled

log = logging.getLogger(__name__)
HOLD = 10.0  # seconds a sender's lock outlives its last renewal: how long a dead sender's events wait
POLL = 1.0  # seconds between tries of a lock another replica holds, and between calls while Redis is unreachable
WAIT = 1  # seconds the sender waits for an event in one call before looking at its lock again (whole: BLMOVE's type)
FLUSH = 5.0  # seconds ``close`` gives the buffer to reach Redis


class RedisQueue:
    """One endpoint's queue in the replicas' Redis. It satisfies ``notify.EventQueue`` (checked by mypy where
    ``backends`` hands it over). Owned by the notifier: ``close`` at shutdown."""

    def __init__(
        self,
        link: RedisLink,
        url: str,
        size: int,
        dropped: Callable[[int], None],
        hold: float = HOLD,
        poll: float = POLL,
    ):
        name = hashlib.sha256(url.encode()).hexdigest()[:16]
        self._link = link
        self._url = url
        self._size = size
        self._dropped = dropped
        self._waiting = key("webhooks", name)
        self._sending = key("webhooks", name, "sending")
        self._lock = link.aio.lock(key("webhooks", name, "lock"), timeout=hold, thread_local=False)
        self._hold = hold
        self._poll = poll
        self._buffer: deque[str] = deque()  # published here, not yet in Redis
        self._writing: list[str] = []  # taken from the buffer by the write under way
        self._buffered = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None  # running while this replica holds the lock
        self._closing = False

    # publishing ----------------------------------------------------------------------------------------------
    def put(self, entry: str) -> None:
        self._buffer.append(entry)
        self._bound()
        self._buffered.set()
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write(), name=f"queueing {self._url}")

    def _bound(self) -> None:
        excess = len(self._buffer) - self._size
        if excess > 0:
            for _ in range(excess):
                self._buffer.popleft()
            self._dropped(excess)

    async def _write(self) -> None:
        """Write the buffer out, oldest first, until ``close``; while Redis fails, keep it and try again."""
        failing = False
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._buffered.clear()
                await self._buffered.wait()
                continue
            self._writing = list(self._buffer)
            self._buffer.clear()
            try:
                dropped = await self._append(self._writing)
            except (RedisError, OSError) as exc:
                self._buffer.extendleft(reversed(self._writing))
                self._writing = []
                self._bound()
                if not failing:
                    log.warning(
                        "cannot queue webhook events for %s in Redis (%s): %d kept here meanwhile, retrying every "
                        "%.1f s",
                        self._url,
                        exc,
                        len(self._buffer),
                        self._poll,
                    )
                failing = True
                if self._closing:
                    return
                await asyncio.sleep(self._poll)
                continue
            self._writing = []
            raise_if_cancelled()
            if failing:
                log.info("webhook events for %s are queued in Redis again", self._url)
            failing = False
            if dropped:
                self._dropped(dropped)

    async def _append(self, entries: list[str]) -> int:
        """One round trip: append, cut the list to its bound; how many of its oldest were cut."""
        async with self._link.aio.pipeline(transaction=True) as pipe:
            pipe.rpush(self._waiting, *entries)
            pipe.ltrim(self._waiting, -self._size, -1)
            length, _ = await pipe.execute()
        return max(0, int(length) - self._size)

    # sending -------------------------------------------------------------------------------------------------
    async def take(self) -> str:
        failing = False
        while True:
            try:
                raise_if_cancelled()
                if self._keeper is None or self._keeper.done():
                    if not await self._lock.acquire(blocking=False):
                        await asyncio.sleep(self._poll)  # another replica sends them
                        continue
                    self._keeper = asyncio.get_running_loop().create_task(self._keep(), name=f"holding {self._url}")
                    log.info("sending the webhook events queued in Redis for %s from this replica", self._url)
                entry = await self._next()
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning(
                        "cannot read the webhook queue of %s in Redis (%s): retrying every %.1f s",
                        self._url,
                        exc,
                        self._poll,
                    )
                failing = True
                await asyncio.sleep(self._poll)
                continue
            raise_if_cancelled()  # before returning: an event taken stays in flight, sent again by the next sender
            if entry is not None:
                return entry

    async def _next(self) -> str | None:
        """The event in flight that a sender which stopped or died left, else the oldest waiting one moved into
        ``sending`` (waiting ``WAIT`` seconds at most for one); None if none came."""
        raw = await self._link.aio.lindex(self._sending, 0)
        if raw is None:
            raw = await self._link.aio.blmove(self._waiting, self._sending, WAIT, "LEFT", "RIGHT")
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def _keep(self) -> None:
        """Renew the lock while this replica sends; return once another replica took it (it expired here)."""
        while True:
            await asyncio.sleep(self._hold / 3)
            try:
                await self._lock.reacquire()
                raise_if_cancelled()
            except LockNotOwnedError:
                log.warning("another replica took over the webhook queue of %s (its lock expired here)", self._url)
                return
            except (RedisError, OSError) as exc:
                log.warning("cannot renew the lock of the webhook queue of %s in Redis: %s", self._url, exc)

    async def done(self, entry: str) -> None:
        failing = False
        while True:
            try:
                await self._link.aio.lrem(self._sending, 1, entry)  # by value: a later event is never removed
                raise_if_cancelled()
                return
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("cannot mark a webhook event of %s sent in Redis (%s): retrying", self._url, exc)
                failing = True
                await asyncio.sleep(self._poll)

    async def join(self) -> None:
        while True:
            if not self._buffer and not self._writing:
                try:
                    async with self._link.aio.pipeline(transaction=True) as pipe:
                        pipe.llen(self._waiting)
                        pipe.llen(self._sending)
                        empty = sum(await pipe.execute()) == 0
                    raise_if_cancelled()
                    if empty:
                        return
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(min(self._poll, 0.05))

    async def close(self) -> int:
        """Write what is buffered (``FLUSH`` seconds at most) and let the lock go, so another replica takes over at
        once; how many events were not written (lost)."""
        self._closing = True
        self._buffered.set()
        if self._writer is not None:
            finished, _ = await asyncio.wait({self._writer}, timeout=FLUSH)
            if not finished:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
        lost = len(self._buffer) + len(self._writing)
        if self._keeper is not None:
            held = not self._keeper.done()
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            if held:
                try:
                    await self._lock.release()
                except (RedisError, OSError) as exc:  # expired meanwhile, or Redis gone: it expires by itself
                    log.warning("cannot let go of the webhook queue of %s in Redis: %s", self._url, exc)
        return lost
