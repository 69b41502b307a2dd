"""Fetch leases in the replicas' Redis: the Redis side of ``pull.leases`` (one upstream fetch per digest for the
whole cluster).

One key per fetch, ``mirror:lease:<registry>:<digest>``, whose value names its holder: "<fetch id> <advertise
URL>". The holder took it with ``SET NX PX`` (nobody else can while it exists), renews its expiry while the fetch
runs (``renew``) and deletes it when the fetch ended (``release``); a holder that dies stops renewing and the key
expires after ``ttl`` seconds. Renewal and release compare the value first (one Lua script each, atomic in Redis):
a holder whose lease expired (it stalled) and was taken by another never extends or deletes the new holder's.

Once the holder's upstream answered, ``announce`` writes the blob's size beside the lease
(``mirror:lease-size:<registry>:<digest>``, renewed and released with it): a HEAD of the blob through any replica
is answered from it, as a HEAD of a blob another worker is fetching is on one host.

``take`` is one round trip whichever way it goes: ``SET NX PX GET`` (Redis 7) sets the key and answers nil, or
leaves it and answers the holder's value, so a replica that misses learns where to stream from at once.

A holder whose fetch stored the object ends with ``finish`` instead of ``release``: the key then says "stored" for
``stored_ttl`` seconds (longer than a replica's usage table may lag, and no longer than eviction leaves content
alone). So a replica that takes the lease knows no fetch of the blob completed lately, and its miss path need not
ask the bucket again before it asks the upstream; one that finds "stored" reads the object.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mirror.oci.reference import Digest
from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink, key

TTL = 10.0  # seconds a lease lives unless renewed: how long a dead holder's fetch waits before another takes it

# Extend the lease (and its size, KEYS[2]) only if it is still ours (KEYS[1] holds ARGV[1]) by ARGV[2] ms; 1 if it
# was, else 0.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[2], ARGV[2])
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# Delete the lease and its size only if it is still ours; 1 if it was, else 0.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[2]); return redis.call('del', KEYS[1]) end
return 0
"""
# The fetch stored the object: the lease (if still ours) becomes the mark ARGV[3] for ARGV[2] ms; its size goes.
_FINISH = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[2])
  return redis.call('set', KEYS[1], ARGV[3], 'PX', ARGV[2]) and 1
end
return 0
"""
# Write the size (ARGV[2]) with the lease's expiry (ARGV[3] ms) only if the lease is still ours; 1 if it was.
_ANNOUNCE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3]) and 1 end
return 0
"""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lease: one fetch (``fetch_id``, unique to it) of the replica reachable at ``advertise``."""

    fetch_id: str
    advertise: str

    @classmethod
    def new(cls, advertise: str) -> Holder:
        return cls(secrets.token_hex(8), advertise)

    @classmethod
    def parse(cls, value: bytes | str) -> Holder:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        fetch_id, _, advertise = text.partition(" ")
        return cls(fetch_id, advertise)

    def value(self) -> str:
        return f"{self.fetch_id} {self.advertise}"


STORED = Holder("stored", "")  # what ``take`` answers while the key marks a fetch that stored the object lately


def lease_key(registry: str, digest: Digest) -> str:
    return key("lease", registry, str(digest))


def size_key(registry: str, digest: Digest) -> str:
    return key("lease-size", registry, str(digest))


class Leases:
    """The fetch leases of one Redis. Every call raises ``StoreUnavailable`` when Redis cannot be reached."""

    def __init__(self, link: RedisLink, ttl: float = TTL):
        self._link = link
        self.ttl = ttl
        self._renew = link.aio.register_script(_RENEW)
        self._release = link.aio.register_script(_RELEASE)
        self._finish = link.aio.register_script(_FINISH)
        self._announce = link.aio.register_script(_ANNOUNCE)

    @property
    def _ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def take(self, registry: str, digest: Digest, holder: Holder) -> Holder | None:
        """Take the lease of ``digest`` from ``registry`` for ``holder``: None when it is now ours (and no fetch of it
        stored the object lately), ``STORED`` when one did, else who holds it. One round trip."""
        try:
            found = await self._link.aio.set(
                lease_key(registry, digest), holder.value(), nx=True, px=self._ms, get=True
            )
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {self._link.url}: {exc}") from exc
        if found is None:
            return None
        assert isinstance(found, (bytes, str)), found  # SET ... GET answers the old value or nil
        return Holder.parse(found)

    async def holder(self, registry: str, digest: Digest) -> Holder | None:
        """Who holds the lease now; None when nobody does."""
        try:
            found = await self._link.aio.get(lease_key(registry, digest))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {self._link.url}: {exc}") from exc
        return None if found is None else Holder.parse(found)

    async def announce(self, registry: str, digest: Digest, holder: Holder, size: int) -> bool:
        """The blob's size as ``holder``'s upstream announced it; False when the lease is not ``holder``'s."""
        return await self._script(self._announce, registry, digest, holder, size, self._ms)

    async def announced(self, registry: str, digest: Digest) -> int | None:
        """The size the holder announced while someone holds the lease; None otherwise."""
        try:
            lease, size = await self._link.aio.mget(lease_key(registry, digest), size_key(registry, digest))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {self._link.url}: {exc}") from exc
        return int(size) if lease is not None and size is not None else None

    async def renew(self, registry: str, digest: Digest, holder: Holder) -> bool:
        """Extend ``holder``'s lease by ``ttl``; False when it is not (or no longer) ``holder``'s."""
        return await self._script(self._renew, registry, digest, holder, self._ms)

    async def release(self, registry: str, digest: Digest, holder: Holder) -> bool:
        """Delete ``holder``'s lease; False when it was not (or no longer) ``holder``'s: another's is left alone."""
        return await self._script(self._release, registry, digest, holder)

    async def finish(self, registry: str, digest: Digest, holder: Holder, stored_ttl: float) -> bool:
        """``holder``'s fetch stored the object: its lease becomes the "stored" mark for ``stored_ttl`` seconds;
        False when the lease was not (or no longer) ``holder``'s."""
        return await self._script(
            self._finish, registry, digest, holder, max(1, int(stored_ttl * 1000)), STORED.value()
        )

    async def forget_stored(self, registry: str, digest: Digest) -> bool:
        """Drop the "stored" mark (the object is gone: removed since); False if the key is not that mark."""
        return await self.release(registry, digest, STORED)

    async def _script(
        self, script: AsyncScript, registry: str, digest: Digest, holder: Holder, *args: int | str
    ) -> bool:
        try:
            keys = [lease_key(registry, digest), size_key(registry, digest)]
            done = await script(keys=keys, args=[holder.value(), *args])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {self._link.url}: {exc}") from exc
        return bool(done)
