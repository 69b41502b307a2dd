"""The upstreams' saving windows, shared by the replicas (``[cluster]``): ``upstream.quota.QuotaRecord`` in Redis,
as ``storage.quotas`` keeps it in files for the processes of one host. One 429 (or a quota running low) seen by any
replica holds back the revalidations of all of them.

``mirror:quota:<registry>`` is a hash {until, reason}, expiring when its window ends. Every method blocks (the
synchronous client): call it in a thread. A Redis that cannot be reached is an OSError, as a file that cannot be
read: the caller logs it, and each replica still keeps its own window in memory.
"""

from __future__ import annotations

import time

from redis.exceptions import RedisError

from mirror.storage.cluster import RedisLink, key


class RedisQuota:
    """One upstream's record. It satisfies ``upstream.quota.QuotaRecord`` (checked by mypy where it is handed over)."""

    def __init__(self, link: RedisLink, registry: str):
        self._link = link
        self._key = key("quota", registry)

    def read_sync(self) -> tuple[float, str]:
        try:
            raw = self._link.sync.hgetall(self._key)
        except RedisError as exc:
            raise OSError(f"the cluster's Redis: {exc}") from exc
        try:
            reason = raw[b"reason"]
            return float(raw[b"until"]), reason.decode() if isinstance(reason, bytes) else str(reason)
        except (KeyError, ValueError, TypeError, AttributeError):
            return 0.0, ""

    def write_sync(self, until: float, reason: str) -> None:
        try:
            with self._link.sync.pipeline(transaction=True) as pipe:
                pipe.hset(self._key, mapping={"until": repr(until), "reason": reason})
                pipe.expireat(self._key, int(max(until, time.time())) + 1)
                pipe.execute()
        except RedisError as exc:
            raise OSError(f"the cluster's Redis: {exc}") from exc
