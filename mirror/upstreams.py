"""The upstream clients a configuration names, one per upstream registry (a wildcard host's made on first use),
their tag policies and the routing set over them; ``app.create_app`` and the admin commands build them here."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mirror.backends import quota_record
from mirror.config import DEFAULT_MAX_BLOB_SIZE, Config, UpstreamConfig
from mirror.metrics import Metrics
from mirror.oci.reference import canonical_registry
from mirror.pull.service import TagPolicy
from mirror.routing import RepoRules, Upstreams
from mirror.upstream.auth import Credentials
from mirror.upstream.client import UpstreamClient, UpstreamSettings
from mirror.upstream.quota import QuotaRecord

if TYPE_CHECKING:
    from mirror.storage.cluster import RedisLink

USER_AGENT = "mirror/0.1 (+pull-through registry cache)"


def upstream_client(
    upstream: UpstreamConfig,
    registry: str,
    metrics: Metrics,
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
    loop_id: str = "",
    quota: QuotaRecord | None = None,
) -> UpstreamClient:
    secret = upstream.secret()
    credentials = Credentials(upstream.username, secret) if upstream.username and secret is not None else None
    settings = UpstreamSettings(
        registry=registry,
        url=upstream.url.replace("{registry}", registry),
        credentials=credentials,
        token=upstream.bearer(),
        timeout=upstream.timeout,
        max_connections=upstream.max_connections,
        ratelimit_threshold=upstream.ratelimit_threshold,
        ratelimit_pause=upstream.ratelimit_pause,
        user_agent=USER_AGENT,
        max_blob_size=max_blob_size,
        min_rate=upstream.min_rate,
        rate_window=upstream.rate_window,
        loop_id=loop_id,
    )
    return UpstreamClient(settings, metrics, quota)


def build_upstreams(
    config: Config, metrics: Metrics, loop_id: str = "", link: RedisLink | None = None
) -> tuple[dict[str, UpstreamClient], dict[str, TagPolicy], Upstreams]:
    """A client and a tag policy per configured upstream, and the routing set over them. The two dicts are
    shared with the pull-through service, so a wildcard host's client added later is seen there too."""
    clients: dict[str, UpstreamClient] = {}
    policies: dict[str, TagPolicy] = {}
    rules: dict[str, RepoRules] = {}
    wildcard = next((u for u in config.upstreams if u.wildcard), None)

    def add(registry: str, upstream: UpstreamConfig) -> None:
        # Processes sharing the data dir, or replicas, share each upstream's quota window (one 429 holds all back).
        quota = quota_record(config, link, registry)
        clients[registry] = upstream_client(upstream, registry, metrics, config.max_blob_size, loop_id, quota)
        policies[registry] = TagPolicy(upstream.tag_ttl, upstream.max_stale, upstream.timeout)

    for upstream in config.upstreams:
        if not upstream.wildcard:
            registry = canonical_registry(upstream.registry)
            add(registry, upstream)
            rules[registry] = RepoRules(upstream.allow, upstream.deny)

    def add_wildcard(registry: str) -> None:
        assert wildcard is not None  # Upstreams only admits wildcard hosts when allow_hosts is configured
        add(registry, wildcard)
        metrics.prime([registry])

    closing: set[asyncio.Task[None]] = set()

    def drop_wildcard(registry: str) -> None:
        """A wildcard host left the routing table (least recently used, idle): close its client."""
        policies.pop(registry, None)
        client = clients.pop(registry, None)
        if client is not None:
            task = asyncio.get_running_loop().create_task(client.close())
            closing.add(task)
            task.add_done_callback(closing.discard)

    routing = Upstreams(
        canonical_registry(config.default_upstream.registry),
        rules,
        add_wildcard,
        wildcard.allow_hosts if wildcard else (),
        RepoRules(wildcard.allow, wildcard.deny) if wildcard else None,
        idle=lambda registry: registry not in clients or clients[registry].users == 0,
        drop=drop_wildcard,
    )
    return clients, policies, routing
