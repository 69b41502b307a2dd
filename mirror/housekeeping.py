"""The housekeeping of one store, for ``mirror serve`` and for a CLI command beside it: the housekeeper (flushes,
the byte cap's eviction) and the admin logic built over it (``build_housekeeping``), the start-up reconciliation
of the index with the store (``reconcile_logged``), and the admin logic a CLI command opens on its own
(``open_admin``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from mirror.admin import Admin, GcSettings
from mirror.backends import cluster_link, eviction_turn, open_index, open_store, open_usage
from mirror.config import Config
from mirror.config.cache import cache_config
from mirror.metrics import CacheSnapshot, Metrics
from mirror.oci.reference import Digest, canonical_registry
from mirror.pull.service import PullThrough
from mirror.storage.base import BlobStorage, RegistryIndex, StoreUnavailable
from mirror.storage.eviction import Limits
from mirror.storage.gc import Report, reconcile_sync
from mirror.storage.housekeeper import Housekeeper
from mirror.storage.sessions import held_sync
from mirror.storage.usage import Usage
from mirror.upstream.client import UpstreamClient
from mirror.upstreams import build_upstreams

if TYPE_CHECKING:
    from mirror.storage.cluster import RedisLink
    from mirror.storage.s3 import S3Store

log = logging.getLogger(__name__)


def build_housekeeping(
    config: Config,
    store: BlobStorage,
    index: RegistryIndex,
    usage: Usage,
    pull: PullThrough | None,
    metrics: Metrics,
    default_registry: str,
    link: RedisLink | None,
    live: bool = True,
) -> tuple[Housekeeper, Admin]:
    """The housekeeper (flushes, eviction) and the admin logic over one store, for ``serve`` or a CLI command."""
    cache = cache_config(config)
    # A CLI process cannot see the server's leases, nor a replica the other replicas': leave what was served lately.
    min_idle = 0.0 if live and link is None else 2 * cache.flush_interval + 5
    limits = Limits(cache.size, cache.high_watermark, cache.low_watermark, cache.flush_interval, cache.pins, min_idle)

    def evicted(kind: str, size: int) -> None:
        metrics.evictions.labels(kind).inc()
        metrics.evicted_bytes.labels(kind).inc(size)

    def busy(key: str) -> bool:
        return usage.busy(key) or (pull is not None and pull.inflight.fetching(Digest.parse(key)))

    # Processes on the data dir evict one at a time: a server tries the lock at each eviction (alone on the data dir
    # too, so that a CLI command beside it waits); a CLI command's Admin waits for it around every removal.
    turn = eviction_turn(config, link)
    housekeeper = Housekeeper(store, index, usage, limits, busy, evicted, metrics.repos.drain, turn if live else None)
    metrics.repos.configure(cache.top_repos, cache.repo_allowlist)
    metrics.cache.source = lambda: CacheSnapshot(
        usage.total + usage.upload_bytes, limits.size, usage.pending, usage.counts(), housekeeper.protected_bytes
    )
    if metrics.shared_dir is not None:  # several processes: each one's fetches under way, summed at the scrape
        usage.on_pending = metrics.cache_pending.set
    gc_settings = GcSettings(cache.gc_grace, cache.tmp_max_age)
    # gc and verify through a server's admin API wait for the lock too when other processes or replicas evict; its
    # own evictions take the housekeeper's.
    shares = link is not None or config.coordination == "files"
    admin_turn = (eviction_turn(config, link) if shares else None) if live else turn
    admin = Admin(store, index, usage, housekeeper, pull, default_registry, gc_settings, live, admin_turn)
    return housekeeper, admin


def reconcile_logged(store: BlobStorage, index: RegistryIndex, usage: Usage) -> Report | None:
    """``gc.reconcile_sync`` at start-up, logged. With a bucket the content is what the bucket lists (never this
    replica's empty disk), so a replica joining a cluster drops no shared record. None when the bucket or the
    cluster's Redis cannot be reached: the mirror starts unreconciled and /readyz says why."""
    try:
        report = reconcile_sync(store, index, usage)
    except StoreUnavailable as exc:
        log.warning("start-up: the index was not reconciled with the store: %s", exc)
        return None
    if report.records_added or report.records_dropped or report.removed:
        log.warning(
            "start-up: the index did not match the disk: %d files without a record (added), %d records without a "
            "file (dropped), %d stray files quarantined",
            report.records_added,
            report.records_dropped,
            len(report.removed),
        )
    return report


@contextlib.asynccontextmanager
async def open_admin(config: Config, upstreams: bool = False, lock_timeout: float = 120.0) -> AsyncIterator[Admin]:
    """The admin logic for a CLI command beside (or without) a running server on the same data dir. With
    ``upstreams`` (prefetch) it also builds the pull-through service. A command that removes content waits up to
    ``lock_timeout`` seconds for the servers' eviction lock; the servers reload their table when it is done."""
    metrics = Metrics()
    link = cluster_link(config)  # with [cluster], the index is the replicas' shared one

    def open_stores() -> tuple[BlobStorage, S3Store | None, RegistryIndex, Usage]:  # directories, SQLite: off the loop
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store, _, bucket = open_store(config)
        return store, bucket, open_index(config, link), open_usage(config, link, serving=False)

    store, bucket, index, usage = await asyncio.to_thread(open_stores)
    clients: dict[str, UpstreamClient] = {}
    pull = None
    if upstreams:
        clients, policies, _ = build_upstreams(config, metrics)
        pull = PullThrough(store, index, clients, policies, metrics, usage=usage)
    default = canonical_registry(config.default_upstream.registry)
    housekeeper, admin = build_housekeeping(config, store, index, usage, pull, metrics, default, link, live=False)
    admin.turn_timeout = lock_timeout
    try:
        usage.install(*await asyncio.to_thread(usage.load_sync))
        usage.upload_sessions, usage.upload_bytes = await asyncio.to_thread(held_sync, config.data_dir)
        yield admin
        await housekeeper.flush()
    finally:
        if pull is not None:
            await pull.close()
        for client in clients.values():
            await client.close()
        index.close()
        usage.close()
        if bucket is not None:
            await bucket.close()
        if link is not None:
            await link.close()
