"""The replicas' counterpart of ``storage.counter.SharedCounter``: a number in the cluster's Redis that any replica
bumps (rarely: a push made a repository local) and every replica reads on its hot path at no cost.

A Redis read on every request would cost a round trip each. Instead each replica keeps the last value it read
(``value``) and reads it again when a bump is announced on the channel of the same name (Redis pub/sub: a
millisecond after the bump on loopback), and every ``POLL`` seconds in case an announcement was lost (Redis
restarted). A push bumps it at its first blob, well before the manifest that makes the image pullable, so the
other replicas route the name as local before a pull of it can succeed. While Redis cannot be reached the last
value stays, and the names known stay routed as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink, key, raise_if_cancelled

log = logging.getLogger(__name__)
POLL = 1.0  # seconds between reads of the number when no bump is announced


class RedisCounter:
    """The number at ``mirror:<name>``. Owned by the app: ``lifecycle`` in ``app.cleanup_ctx`` keeps it read."""

    def __init__(self, link: RedisLink, name: str, poll: float = POLL):
        self._link = link
        self._key = key(name)
        self._poll = poll
        self._value = 0

    def value(self) -> int:
        return self._value

    def bump_sync(self) -> int:
        """Change it and announce that, for every replica to see; returns the new value (blocking: in a thread).
        It goes up by a random step: a Redis that restarted empty never shows again the value a replica last read,
        whose change would then go unseen."""
        try:
            with self._link.sync.pipeline(transaction=True) as pipe:
                pipe.incrby(self._key, secrets.randbelow(1 << 40) + 1)
                pipe.publish(self._key, "bumped")
                value, _ = pipe.execute()
            return int(value)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the cluster's Redis cannot be reached or failed: {exc}") from exc

    async def read(self) -> None:
        raw = await self._link.aio.get(self._key)
        self._value = int(raw or 0)

    async def lifecycle(self, _app: Any) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(self._follow(), name=f"following {self._key}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self) -> None:
        failing = False
        pubsub: PubSub | None = None
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self._link.aio.pubsub()
                        await pubsub.subscribe(self._key)
                    await self.read()  # after subscribing: no bump since goes unseen
                    if failing:
                        log.info("following %s in Redis again", self._key)
                    failing = False
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll)
                    raise_if_cancelled()
                except (RedisError, OSError, ValueError) as exc:
                    if not failing:
                        log.warning(
                            "cannot follow %s in Redis (%s): other replicas' pushes wait for it", self._key, exc
                        )
                    failing = True
                    if pubsub is not None:
                        await _close(pubsub)
                        pubsub = None
                    await asyncio.sleep(self._poll)
        finally:
            if pubsub is not None:
                await _close(pubsub)


async def _close(pubsub: PubSub) -> None:
    with contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
