"""Every Prometheus metric of the mirror, in one place.

Conventions: prefix ``mirror_``, base units (``_bytes``, ``_seconds``), counters end in ``_total``, small closed
label sets (never a label per digest or per tag). Names say which way bytes flow: ``served`` is mirror -> client,
``fetched`` is upstream -> mirror. "Bytes saved" is ``mirror_blob_bytes_served_total{source="cache"}``.

A ``Metrics`` object owns its own ``CollectorRegistry`` so that several apps (tests) never share state.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "mirror_http_requests",
            "Client requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "mirror_http_request_duration_seconds",
            "Time to answer a client request (headers and body).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "mirror_cache_requests",
            "Lookups in the cache by kind (blob, manifest, tag) and result (hit, miss, stale).",
            ["upstream", "kind", "result"],
            registry=r,
        )
        self.blob_bytes_served = Counter(
            "mirror_blob_bytes_served",
            "Blob bytes sent to clients, by where they came from (cache or upstream).",
            ["upstream", "source"],
            registry=r,
        )
        self.upstream_bytes_fetched = Counter(
            "mirror_upstream_bytes_fetched",
            "Bytes of blobs and manifests received from upstreams.",
            ["upstream"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests to upstreams by kind (manifest, blob, tags, token) and outcome.",
            ["upstream", "kind", "outcome"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "mirror_upstream_request_duration_seconds",
            "Time until an upstream answered (headers).",
            ["upstream", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.coalesced_waiters = Counter(
            "mirror_coalesced_waiters",
            "Client requests that joined a fetch already under way instead of starting one.",
            ["upstream"],
            registry=r,
        )
        self.inflight_fetches = Gauge(
            "mirror_inflight_fetches",
            "Blob fetches from upstreams under way.",
            registry=r,
        )
        self.stale_served = Counter(
            "mirror_stale_served",
            "Tags answered from the cache because the upstream could not be asked, by reason.",
            ["upstream", "reason"],
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "Pull quota the upstream announced (ratelimit-limit header).",
            ["upstream"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left in the upstream's window (ratelimit-remaining header).",
            ["upstream"],
            registry=r,
        )
        # --- local pushes (mirror.push, mirror.auth, mirror.notify) ---------------------------------------------
        self.upload_sessions = Gauge(
            "mirror_upload_sessions",
            "Push upload sessions open on disk (started, not yet completed, cancelled or expired).",
            registry=r,
        )
        self.upload_sessions_started = Counter(
            "mirror_upload_sessions_started",
            "Push upload sessions started (POST without a digest).",
            registry=r,
        )
        self.push_bytes_received = Counter(
            "mirror_push_bytes_received",
            "Blob bytes received from clients by pushes (chunks that were rolled back excluded).",
            registry=r,
        )
        self.manifest_changes = Counter(
            "mirror_local_manifest_changes",
            "Manifests pushed to or deleted from local repositories, by action (push, delete).",
            ["action"],
            registry=r,
        )
        self.auth_requests = Counter(
            "mirror_auth_requests",
            "Access decisions on client requests, by outcome (anonymous, authenticated, unauthorized, denied, "
            "read_only).",
            ["outcome"],
            registry=r,
        )
        self.notifications = Counter(
            "mirror_notifications",
            "Webhook notifications by outcome (sent, retried, failed after every attempt, dropped: queue full).",
            ["outcome"],
            registry=r,
        )
