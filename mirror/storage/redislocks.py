"""Locks of the replicas (``[cluster]``): of the upstream requests about one ref, and of eviction.

Ref locks (a tag, a manifest by digest): the whole cluster asks the upstream about a ref once at a time, as
``storage.reflocks`` does for the processes of one host. redis-py's lock (``SET NX PX`` to take, a token-checked
delete to let go): ``mirror:ref:<hash of the key>``.

A replica waiting for another's lock tries again every ``poll`` seconds for at most ``within`` seconds; past that
the block runs without it and the caller decides (the pull service answers as for an upstream slow past its
timeout). A holder that dies leaves its lock to expire (``within`` twice over, plus a margin: the block is one
upstream request bounded by that timeout). While Redis cannot be reached the block runs without the lock: it saves
upstream requests, it guards no data (each replica verifies what it stores).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.exceptions import RedisError

from mirror.storage.cluster import RedisLink, key
from mirror.storage.evictlock import EvictionBusy

log = logging.getLogger(__name__)
POLL = 0.01  # seconds between tries of a lock another replica holds
MARGIN = 5.0  # seconds a dead holder's lock outlives the longest block it could have run


class RedisRefLocks:
    """The ref locks of the replicas sharing one Redis. Owned by the app (no module state)."""

    def __init__(self, link: RedisLink, poll: float = POLL):
        self._link = link
        self._poll = poll

    @asynccontextmanager
    async def hold(self, ref: str, within: float) -> AsyncIterator[bool]:
        """Hold ``ref``'s lock inside the block: True, or False when another replica held it for ``within``
        seconds or Redis could not be asked (the block runs without it)."""
        name = key("ref", hashlib.sha256(ref.encode()).hexdigest()[:32])
        lock = self._link.aio.lock(name, timeout=2 * within + MARGIN, sleep=self._poll, blocking_timeout=within)
        try:
            held = bool(await lock.acquire())
        except (RedisError, OSError) as exc:
            log.warning("cannot take the lock of %s in Redis (%s): asking the upstream without it", ref, exc)
            held = False
        if not held:
            log.info("another replica held the lock of %s for %.1f s", ref, within)
        try:
            yield held
        finally:
            if held:
                try:
                    await lock.release()
                except (RedisError, OSError) as exc:  # expired meanwhile, or Redis gone: it expires by itself
                    log.warning("cannot release the lock of %s in Redis: %s", ref, exc)


class RedisEvictionLock:
    """``evictlock.EvictionLock`` for replicas: one replica (or ``mirror evict``, ``gc``, ``verify`` beside one)
    removes content at a time, cluster-wide. ``mirror:evict`` is redis-py's lock with a TTL that a thread renews
    while it is held, so a holder that dies lets go within ``ttl`` seconds. Blocking calls: run them in a thread.
    """

    def __init__(self, link: RedisLink, ttl: float = 30.0):
        self._link = link
        self._ttl = ttl
        self._lock: Any = None
        self._renewing: threading.Event | None = None

    def try_acquire_sync(self) -> bool:
        """Take the lock if no replica holds it; False if one does, or Redis cannot be asked."""
        return self._take(blocking=False, timeout=None)

    def acquire_sync(self, timeout: float) -> None:
        """Take the lock, waiting up to ``timeout`` seconds; EvictionBusy after."""
        if not self._take(blocking=True, timeout=timeout):
            raise EvictionBusy(
                f"another replica (or a mirror evict, gc or verify beside one) held the cluster's eviction lock "
                f"for {timeout:g} s; try again later or wait longer (--lock-timeout)"
            )

    def _take(self, blocking: bool, timeout: float | None) -> bool:
        assert self._lock is None, "taken twice"
        lock = self._link.sync.lock(key("evict"), timeout=self._ttl, sleep=0.05, thread_local=False)
        try:
            taken = bool(lock.acquire(blocking=blocking, blocking_timeout=timeout))
        except (RedisError, OSError) as exc:
            log.warning("cannot take the cluster's eviction lock in Redis: %s", exc)
            return False
        if taken:
            self._lock, self._renewing = lock, threading.Event()
            threading.Thread(target=self._renew, args=(lock, self._renewing), daemon=True, name="evict lock").start()
        return taken

    def _renew(self, lock: Any, stop: threading.Event) -> None:
        while not stop.wait(self._ttl / 3):
            try:
                lock.reacquire()
            except (RedisError, OSError) as exc:
                log.warning("cannot renew the cluster's eviction lock in Redis: %s", exc)

    def release_sync(self) -> None:
        lock, renewing = self._lock, self._renewing
        self._lock = self._renewing = None
        if renewing is not None:
            renewing.set()
        if lock is not None:
            try:
                lock.release()
            except (RedisError, OSError) as exc:  # expired meanwhile, or Redis gone: it expires by itself
                log.warning("cannot release the cluster's eviction lock in Redis: %s", exc)
