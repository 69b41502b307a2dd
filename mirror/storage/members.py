"""Membership of a cluster: each replica registers in Redis with a heartbeat; ``mirror cluster status`` and
``GET /admin/v1/cluster`` list the replicas alive.

Keys (``storage.cluster.key``):

    mirror:member:<id>      string, expiring ``ttl`` s after it is set: JSON {"id", "advertise", "started_at",
                            "fetches", "held", "ttl"}, written again every ``HEARTBEAT`` seconds by the replica
                            ``<id>``; "held": the blob fetches it runs for the cluster (at most ``HELD_LISTED``),
                            for the other replicas' web pages
    mirror:members          zset <id> -> when it first registered (unix time): the ids to look up, so a
                            listing is one ZRANGE and one pipeline, never a SCAN

A replica that dies stops renewing its key, which expires ``TTL`` seconds after its last beat: it drops out of
the listing by itself (and out of the zset at the next listing). One that stops cleanly leaves at once. When each
was last seen is told by the key's remaining time to live (``PTTL``), so the replicas' clocks need not agree.
Redis down: beats fail (logged once) and resume when it is back, re-registering the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

from redis.exceptions import RedisError

from mirror.storage.base import StoreUnavailable
from mirror.storage.cluster import RedisLink, key, raise_if_cancelled

log = logging.getLogger(__name__)
HEARTBEAT = 2.0  # seconds between two beats of a replica
TTL = 6.0  # seconds a beat keeps a replica listed: three beats missed and it is gone
HELD_LISTED = 50  # fetches a beat lists (the web page shows no more)
MEMBERS = key("members")


@dataclass(frozen=True, slots=True)
class HeldFetch:
    """A blob fetch a replica runs for the cluster (it holds the lease), as of its last beat."""

    registry: str
    digest: str
    repo: str
    size: int | None
    written: int
    started: float  # time.time() on that replica


@dataclass(frozen=True, slots=True)
class Member:
    """A replica as the listing shows it; ``last_seen`` is on the reader's clock."""

    id: str
    advertise: str
    started_at: float
    fetches: int  # blob fetches from upstreams under way on that replica at its last beat
    last_seen: float
    held: tuple[HeldFetch, ...] = ()  # those it holds the lease of (the first HELD_LISTED)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"the cluster's Redis cannot be reached: {exc}") from exc


class Members:
    """Register, renew, leave, list: each one round trip to Redis. Errors are ``StoreUnavailable``."""

    def __init__(self, link: RedisLink, ttl: float = TTL):
        self._link = link
        self.ttl = ttl

    async def beat(
        self, id: str, advertise: str, started_at: float, fetches: int, held: Sequence[HeldFetch] = ()
    ) -> None:
        listed = [asdict(fetch) for fetch in held[:HELD_LISTED]]
        fields = {"id": id, "advertise": advertise, "started_at": started_at, "fetches": fetches, "held": listed}
        value = json.dumps({**fields, "ttl": self.ttl})
        with _unavailable():
            async with self._link.aio.pipeline(transaction=True) as pipe:
                pipe.set(key("member", id), value, px=int(self.ttl * 1000))
                pipe.zadd(MEMBERS, {id: started_at}, nx=True)
                await pipe.execute()

    async def leave(self, id: str) -> None:
        with _unavailable():
            async with self._link.aio.pipeline(transaction=True) as pipe:
                pipe.delete(key("member", id))
                pipe.zrem(MEMBERS, id)
                await pipe.execute()

    async def list(self) -> list[Member]:
        """The replicas alive, oldest first."""
        with _unavailable():
            ids = [i.decode() for i in cast(list[bytes], await self._link.aio.zrange(MEMBERS, 0, -1))]
            async with self._link.aio.pipeline(transaction=True) as pipe:
                for id in ids:
                    pipe.get(key("member", id))
                    pipe.pttl(key("member", id))
                replies = await pipe.execute()
            now = time.time()
            found, gone = [], []
            for id, value, remaining in zip(ids, replies[::2], replies[1::2], strict=True):
                member = _member(value, max(remaining, 0) / 1000, now)
                if member is None:
                    gone.append(id)
                else:
                    found.append(member)
            if gone:  # expired: a replica that died (one that beats again meanwhile is added back by its beat)
                await self._link.aio.zrem(MEMBERS, *gone)
            return found


def _member(value: bytes | None, remaining: float, now: float) -> Member | None:
    """The entry of a replica, seen ``ttl - remaining`` seconds before ``now`` (its key was set to live ``ttl``)."""
    try:
        fields = json.loads(value) if value is not None else None
        if not isinstance(fields, dict):
            return None
        last_seen = now - max(0.0, float(fields["ttl"]) - remaining)
        started_at, fetches = float(fields["started_at"]), int(fields["fetches"])
        held = tuple(_held(item) for item in fields.get("held", ())[:HELD_LISTED])
        return Member(str(fields["id"]), str(fields["advertise"]), started_at, fetches, last_seen, held)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _held(item: dict[str, Any]) -> HeldFetch:
    size = item["size"]
    return HeldFetch(
        str(item["registry"]),
        str(item["digest"]),
        str(item["repo"]),
        None if size is None else int(size),
        int(item["written"]),
        float(item["started"]),
    )


class Heartbeat:
    """This replica's registration, renewed every ``interval`` seconds by a task of its own; ``close`` leaves."""

    def __init__(
        self,
        members: Members,
        id: str,
        advertise: str,
        fetches: Callable[[], int] = lambda: 0,
        held: Callable[[], Sequence[HeldFetch]] = tuple,
        interval: float = HEARTBEAT,
    ):
        self._members = members
        self.id = id
        self._advertise = advertise
        self._fetches = fetches
        self._held = held
        self._interval = interval
        self._started_at = time.time()
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        await self._members.beat(self.id, self._advertise, self._started_at, self._fetches(), self._held())

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.beat()
                if failing:
                    log.info("cluster membership renewed: Redis answers again")
                failing = False
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("cluster membership not renewed (retrying every %.0f s): %s", self._interval, exc)
                failing = True
            raise_if_cancelled()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster heartbeat")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StoreUnavailable):  # Redis down: the entry expires by itself
            await self._members.leave(self.id)
