"""Which replica holds each upload session (``[cluster]``): ``mirror:upload:<uuid>`` -> the holder's advertise URL.

A session's bytes and hash state live on the replica that opened it (``storage.sessions``, under its data dir). A
chunked push whose requests a load balancer spreads over the replicas still works: a replica that gets a request
for a session it does not hold looks the holder up here and forwards the request to it (``api.forward``). The
record expires with the session's idle age, renewed at every chunk.
"""

from __future__ import annotations

from redis.exceptions import RedisError

from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink, key


class UploadOwners:
    def __init__(self, link: RedisLink, advertise: str, ttl: float):
        self._link = link
        self.advertise = advertise
        self._ttl = max(1, int(ttl))

    async def claim(self, uuid: str) -> None:
        """This replica holds ``uuid``: recorded, or renewed for another idle age."""
        try:
            await self._link.aio.set(key("upload", uuid), self.advertise, ex=self._ttl)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the cluster's Redis cannot be reached or failed: {exc}") from exc

    async def holder(self, uuid: str) -> str | None:
        """The advertise URL of the replica holding ``uuid``, or None (no such session, or it expired)."""
        try:
            raw = await self._link.aio.get(key("upload", uuid))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the cluster's Redis cannot be reached or failed: {exc}") from exc
        return raw.decode() if isinstance(raw, bytes) else raw

    async def release(self, uuid: str) -> None:
        try:
            await self._link.aio.delete(key("upload", uuid))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the cluster's Redis cannot be reached or failed: {exc}") from exc
