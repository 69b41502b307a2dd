"""What a configuration names beneath the app: the store (disk or bucket), the index (on the data dir or the
replicas' Redis), the fetch coordinator (one process, processes sharing a data dir, or replicas), the webhook queues
(in memory or the replicas' Redis), and a replica's membership. ``app.create_app`` and the admin commands build them
from here; the optional extras (aiobotocore for "s3", redis-py for "cluster") are imported only when the
configuration asks for them.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mirror.api.forward import UploadForwarding
from mirror.api.peer import Peering
from mirror.config import Config, ConfigError
from mirror.config.cache import cache_config
from mirror.config.cluster import cluster_config
from mirror.config.storage import storage_config
from mirror.metrics import Metrics
from mirror.notify import EventQueue, MemoryQueue, QueueFactory
from mirror.oci.reference import Digest
from mirror.pull.filelock import FileLocks
from mirror.pull.inflight import FetchCoordinator, InFlight, RefLocking, RemoteFetch
from mirror.storage.base import BlobStorage, RegistryIndex
from mirror.storage.blobs import BlobStore
from mirror.storage.counter import ChangeCounter, SharedCounter
from mirror.storage.evictlock import EvictionLock, EvictionTurn
from mirror.storage.fetchlocks import FetchLocks
from mirror.storage.index import Index
from mirror.storage.quotas import QuotaFile
from mirror.storage.reflocks import RefLocks
from mirror.storage.usage import Usage
from mirror.upstream.quota import QuotaRecord

if TYPE_CHECKING:
    from mirror.storage.cluster import RedisLink
    from mirror.storage.s3 import S3Store


def open_store(config: Config) -> tuple[BlobStorage, BlobStore, S3Store | None]:
    """The store ``[storage]`` names, the local files beside it (temp, lock and upload session files), and the bucket
    the HTTP layer streams hits from: files under ``--data-dir`` (disk, no bucket) or a bucket (s3)."""
    storage = storage_config(config)
    if not storage.s3:
        disk = BlobStore(config.data_dir)
        return disk, disk, None
    from mirror.storage.s3 import Bucket, S3Store  # here: aiobotocore is the optional extra "s3"

    location = Bucket(
        storage.bucket, storage.endpoint_url, storage.region, storage.prefix, storage.access_key, storage.secret_key
    )
    bucket = S3Store(config.data_dir, location, storage.local_cache)  # local_cache: the tier's bound (0: none)
    return bucket, bucket.local, bucket


def cluster_link(config: Config) -> RedisLink | None:
    """The replicas' shared Redis, with ``[cluster]``; None for one node (no other service needed)."""
    cluster = cluster_config(config)
    if not cluster.enabled:
        return None
    from mirror.storage.cluster import RedisLink  # here: redis-py is the optional extra "cluster"

    return RedisLink.connect(cluster.redis_url)


def name_changes(config: Config, link: RedisLink | None) -> ChangeCounter | None:
    """What tells this process that another one made a repository local (``LocalRegistry.stale``): a counter in
    the data dir shared by its processes, or in the replicas' Redis; None when this process is alone."""
    if link is not None:
        from mirror.storage.rediscounter import RedisCounter  # here: redis-py is the optional extra "cluster"

        return RedisCounter(link, "local-repos-changes")
    if config.coordination == "files":
        return SharedCounter(config.data_dir / "local-repos.count")
    return None


def quota_record(config: Config, link: RedisLink | None, registry: str) -> QuotaRecord | None:
    """Where an upstream's saving window is shared: in Redis (replicas), in a file (processes on the data dir), or
    nowhere (None: this process alone keeps it in memory)."""
    if link is not None:
        from mirror.storage.redisquota import RedisQuota  # here: redis-py is the optional extra "cluster"

        return RedisQuota(link, registry)
    return QuotaFile(config.data_dir, registry) if config.coordination == "files" else None


def webhook_queues(link: RedisLink | None) -> QueueFactory:
    """Where each webhook's events wait: in this process (lost if it stops), or with ``[cluster]`` in the replicas'
    Redis, sent once by whichever replica holds the queue's lock (``storage.redisqueue``)."""
    if link is None:
        return MemoryQueue
    from mirror.storage.redisqueue import RedisQueue  # here: redis-py is the optional extra "cluster"

    def queue(url: str, size: int, dropped: Callable[[int], None]) -> EventQueue:
        return RedisQueue(link, url, size, dropped)

    return queue


def ref_locking(config: Config, files: BlobStore, link: RedisLink | None) -> RefLocking | None:
    """Who else asks the upstream about a tag or a manifest, and must wait its turn: the replicas (locks in Redis),
    the processes on the data dir (lock files), or nobody (None)."""
    if link is not None:
        from mirror.storage.redislocks import RedisRefLocks  # here: redis-py is the optional extra "cluster"

        return RedisRefLocks(link)
    return RefLocks(files.tmp_dir) if config.coordination == "files" else None


def cluster_coordination(
    config: Config, link: RedisLink, bucket: S3Store, metrics: Metrics
) -> tuple[FetchCoordinator, Peering, UploadForwarding]:
    """The fetch coordinator of replicas (a lease per fetch in Redis, followers streaming from its holder), what
    the replicas' internal endpoint serves from it, and the forwarding of upload sessions to their holders."""
    from mirror.pull.leases import Leased  # here: Redis and the peer client come with [cluster] only
    from mirror.storage.leases import Leases
    from mirror.storage.members import Members
    from mirror.storage.uploadowners import UploadOwners
    from mirror.upstream.peers import PeerClient

    cluster = cluster_config(config)
    peers = PeerClient(cluster.secret)  # closed with the coordinator
    members = Members(link)

    async def others() -> list[RemoteFetch]:  # the web page's view of the other replicas' fetches
        found = []
        for member in await members.list():
            if member.advertise == cluster.advertise:
                continue
            for fetch in member.held:
                with contextlib.suppress(ValueError):  # (written by a replica: a digest that does not parse is none)
                    digest = Digest.parse(fetch.digest)
                    found.append(
                        RemoteFetch(fetch.registry, digest, fetch.repo, fetch.size, fetch.written, fetch.started)
                    )
        return found

    # The "stored" mark outlives the lag of a replica's usage table (a flush interval) and lasts no longer than
    # eviction leaves new content alone (``housekeeping.build_housekeeping``'s min_idle for replicas).
    stored_ttl = 2 * cache_config(config).flush_interval + 5
    leased = Leased(
        Leases(link), peers, cluster.advertise, bucket, bucket.local.fetch_writer, metrics, others=others,
        stored_ttl=stored_ttl,
    )  # fmt: skip
    holders = UploadOwners(link, cluster.advertise, config.upload_max_age)
    return leased, Peering(cluster.secret, leased), UploadForwarding(holders, peers)


def open_index(config: Config, link: RedisLink | None) -> RegistryIndex:
    """The index of stored content: on the data dir for one node; with ``[cluster]``, the one the replicas share
    in Redis, so that what one replica recorded (a tag, a manifest, a pushed name) every other one reads."""
    if link is None:
        return Index(config.data_dir)
    from mirror.storage.redisindex import RedisIndex  # here: redis-py is the optional extra "cluster"

    return RedisIndex(link)


def open_usage(config: Config, link: RedisLink | None, serving: bool = True) -> Usage:
    """The usage table: on the data dir (journalled when ``serving`` beside other processes on it), or with
    ``[cluster]`` the one the replicas share in Redis, so the byte cap and the LRU order are the cluster's."""
    if link is not None:
        from mirror.storage.redisusage import RedisUsage  # here: redis-py is the optional extra "cluster"

        return RedisUsage(link)
    return Usage(config.data_dir, shared=serving and config.coordination == "files")


def eviction_turn(config: Config, link: RedisLink | None) -> EvictionTurn:
    """What makes one process the one removing content: a lock in the replicas' Redis, or on the data dir."""
    if link is not None:
        from mirror.storage.redislocks import RedisEvictionLock  # here: redis-py is the optional extra "cluster"

        return RedisEvictionLock(link)
    return EvictionLock(config.data_dir)


def membership(
    config: Config, link: RedisLink, inflight: FetchCoordinator
) -> tuple[Callable[[web.Application], AsyncIterator[None]], Callable[[], Awaitable[list[dict[str, Any]]]]]:
    """With ``[cluster]``: this replica's heartbeat in Redis while it serves (it leaves when it stops), and the
    listing of the members alive that ``GET /admin/v1/cluster`` answers."""
    from mirror.pull.leases import Leased
    from mirror.storage.members import Heartbeat, Members

    members = Members(link)
    me = f"{socket.gethostname()}-{secrets.token_hex(3)}"
    held = inflight.held if isinstance(inflight, Leased) else tuple
    heartbeat = Heartbeat(members, me, cluster_config(config).advertise, lambda: len(inflight.under_way()), held)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        heartbeat.start()
        yield
        await heartbeat.close()

    async def listing() -> list[dict[str, Any]]:
        return [member.as_dict() for member in await members.list()]

    return lifecycle, listing


async def cluster_members(config: Config) -> list[dict[str, Any]]:
    """``mirror cluster status``: the replicas alive, as the admin API lists them."""
    link = cluster_link(config)
    if link is None:
        raise ConfigError("no [cluster] table: this mirror is one node")
    from mirror.storage.members import Members

    try:
        return [member.as_dict() for member in await Members(link).list()]
    finally:
        await link.close()


def coordination(config: Config, store: BlobStore) -> tuple[FetchCoordinator, Callable[[], int]]:
    """The fetch coordinator, and the start-up cleaning of ``tmp/`` that fits it: alone on the data dir, every
    temp file is a leftover; sharing it, only those of fetches no process holds are."""
    if config.coordination == "process":
        return InFlight(), store.clean_tmp
    if config.coordination == "files":
        locks = FetchLocks(store)
        return FileLocks(locks), locks.clean_sync
    raise ConfigError(f"coordination must be process or files, got {config.coordination!r}")
