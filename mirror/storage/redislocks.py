"""Locks of the upstream requests about one ref (a tag, a manifest by digest) across replicas (``[cluster]``): the
whole cluster asks the upstream about a ref once at a time, as ``storage.reflocks`` does for the processes of one
host. redis-py's lock (``SET NX PX`` to take, a token-checked delete to let go): ``mirror:ref:<hash of the key>``.

A replica waiting for another's lock tries again every ``poll`` seconds for at most ``within`` seconds; past that
the block runs without it and the caller decides (the pull service answers as for an upstream slow past its
timeout). A holder that dies leaves its lock to expire (``within`` twice over, plus a margin: the block is one
upstream request bounded by that timeout). While Redis cannot be reached the block runs without the lock: it saves
upstream requests, it guards no data (each replica verifies what it stores).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from mirror.storage.cluster import RedisLink, key

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
