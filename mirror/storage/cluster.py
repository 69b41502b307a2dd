"""The replicas' shared Redis (``[cluster] redis_url``): one connection pool per process, on the event loop, plus
a synchronous client for the ``*_sync`` callers (gc, verify, the CLI, threads), and the names of every key.

Everything the mirror keeps in Redis is under ``mirror:`` (``key``), so a Redis database may be shared with other
programs and ``mirror cluster status`` can find what is ours. redis-py is the optional extra ``cluster``: this
module is imported only when a ``[cluster]`` table is given.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from mirror.storage.base import StoreUnavailable

NAMESPACE = "mirror:"
TIMEOUT = 5.0  # seconds for one Redis call, connecting included: past it the replica counts Redis as unreachable


def raise_if_cancelled() -> None:
    """Raise the cancellation of the current task if one is pending. redis-py's asyncio client can swallow a
    cancellation that arrives while a command is under way (the call returns as if none came; redis-py issues #2028,
    #2551): a loop around its calls would then never end, and the shutdown that cancelled it would wait forever.
    Every loop around Redis calls this after them."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def key(*parts: str) -> str:
    """``key("lease", registry, digest)`` -> ``"mirror:lease:<registry>:<digest>"``."""
    return NAMESPACE + ":".join(parts)


@dataclass(slots=True)
class RedisLink:
    """The two clients of one Redis. Owned by the app: ``close`` at clean-up."""

    url: str
    aio: aioredis.Redis
    sync: redis.Redis

    @classmethod
    def connect(cls, url: str, timeout: float = TIMEOUT) -> RedisLink:
        """Clients of ``url``; nothing is connected until the first call (so a replica starts while Redis is
        down, and reports it in /readyz)."""
        # A pooled connection that Redis closed (a restart) fails its next call once: that call is retried on a
        # fresh connection, so a replica recovers without a restart and without a spurious 503.
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry_on_error": [redis.exceptions.ConnectionError],
        }
        return cls(
            url,
            aioredis.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 1), **options),
            redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **options),
        )

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless Redis answers (``/readyz``)."""
        try:
            await self.aio.ping()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"Redis at {self.url} cannot be reached: {e}") from e

    async def close(self) -> None:
        await self.aio.aclose()
        self.sync.close()
