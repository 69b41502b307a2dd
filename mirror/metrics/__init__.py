"""Every Prometheus metric of the mirror, in one place.

Conventions: prefix ``mirror_``, base units (``_bytes``, ``_seconds``), counters end in ``_total``, small closed
label sets (never a label per digest or per tag). Names say which way bytes flow: ``served`` is mirror -> client,
``fetched`` is upstream -> mirror. "Bytes saved" is ``mirror_blob_bytes_served_total{source="cache"}``.

A ``Metrics`` object owns its own ``CollectorRegistry`` so that several apps (tests) never share state. With
``PROMETHEUS_MULTIPROC_DIR`` set, the values are kept in files shared by the processes of one host and
``/metrics`` answers for all of them (``metrics.host``); each gauge says below how its processes' values combine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from mirror.metrics.collectors import (
    PENDING,
    PENDING_HELP,
    CacheCollector,
    CacheSnapshot,
    RepoStats,
    SessionsCollector,
    SharedRepoCounters,
    Timeline,
)
from mirror.metrics.host import HostCollector, flushing, host_registry, shared_dir, use_value_class

__all__ = ["CacheSnapshot", "Metrics", "RepoStats", "Timeline"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.shared_dir = shared_dir()  # None: this process alone (values in memory)
        use_value_class(self.shared_dir is not None)
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
        # livesum: each process counts the fetches it runs (one process per digest on a shared data dir), and a
        # dead process runs none.
        self.inflight_fetches = Gauge(
            "mirror_inflight_fetches",
            "Blob fetches from upstreams under way.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Replicas sharing a bucket (``pull.leases``): this replica's fetch leases and its peer streams.
        self.leases_held = Gauge(
            "mirror_cluster_leases_held",
            "Fetch leases this replica holds now (it runs those upstream fetches for the whole cluster).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.peer_streams_served = Counter(
            "mirror_cluster_peer_streams_served",
            "Streams of a fetch this replica holds served to other replicas.",
            registry=r,
        )
        self.peer_streams_followed = Counter(
            "mirror_cluster_peer_streams_followed",
            "Fetches another replica held that this one streamed from it instead of fetching upstream.",
            registry=r,
        )
        self.takeovers = Counter(
            "mirror_cluster_takeovers",
            "Fetches whose holder died mid-blob that this replica took over and continued upstream.",
            registry=r,
        )
        self.stale_served = Counter(
            "mirror_stale_served",
            "Tags answered from the cache because the upstream could not be asked, by reason.",
            ["upstream", "reason"],
            registry=r,
        )
        # mostrecent: the upstream's announcement, the same whichever process heard it, so the latest one is the
        # truth (a sum would count one quota N times); a process that exited heard it too, so not "live".
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "Pull quota the upstream announced (ratelimit-limit header).",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left in the upstream's window (ratelimit-remaining header).",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_deferred = Counter(
            "mirror_ratelimit_deferred",
            "Tags served from the cache without revalidation because the upstream's pull quota was low or it had "
            "answered 429, by reason (low_quota, rate_limited).",
            ["upstream", "reason"],
            registry=r,
        )
        # --- local pushes (mirror.push, mirror.access, mirror.notify) -------------------------------------------
        # Counted on disk at the scrape (the sessions directory, shared): no process writes it.
        self.upload_sessions = SessionsCollector()
        r.register(self.upload_sessions)
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
            "read_only, throttled: refused without a password check after repeated failures or too many checks).",
            ["outcome"],
            registry=r,
        )
        self.notifications = Counter(
            "mirror_notifications",
            "Webhook notifications by outcome (sent, retried, failed after every attempt, dropped: queue full).",
            ["outcome"],
            registry=r,
        )
        self.evictions = Counter(
            "mirror_cache_evictions",
            "Entries removed from the cache to stay under --cache-size, by kind (blob, manifest).",
            ["kind"],
            registry=r,
        )
        self.evicted_bytes = Counter(
            "mirror_cache_evicted_bytes",
            "Bytes removed from the cache to stay under --cache-size, by kind.",
            ["kind"],
            registry=r,
        )
        for kind in ("blob", "manifest"):  # present from the start, so dashboards show 0 rather than nothing
            self.evictions.labels(kind)
            self.evicted_bytes.labels(kind)
        # The cache's fill is read from the usage table at the scrape (on disk, shared: the scraping process's copy
        # is the host's), except the bytes of fetches under way: each process has its own, summed (livesum).
        self.cache = CacheCollector(pending=self.shared_dir is None)
        r.register(self.cache)
        self.cache_pending = Gauge(PENDING, PENDING_HELP, registry=None, multiprocess_mode="livesum")
        self.repos = RepoStats(shared=SharedRepoCounters.create() if self.shared_dir else None)
        r.register(self.repos)
        self.timeline = Timeline()  # the web page's last hour: samples of ``totals``

    async def lifecycle(self, _app: Any) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx``: in the multiprocess mode, this process's increments written to its files every
        second (``host.flushing``)."""
        if self.shared_dir is None:
            yield
            return
        async for _ in flushing():
            yield

    def host(self) -> CollectorRegistry:
        """What ``/metrics`` renders. One process: its registry. Several: every process's files and the figures
        read at the scrape; call this on the event loop (it copies what lives there), render the result in a
        thread (it reads files)."""
        if self.shared_dir is None:
            return self.registry
        return host_registry(self.shared_dir, self.repos, [self.cache.frozen(), self.upload_sessions])

    def upstream_summary(self) -> dict[str, dict[str, float | None]]:
        """Per upstream, what the web page shows of its health: pulls left in its quota window (None until it
        announced one), stale answers served, requests that failed (unreachable or an error) and 429s. Read from
        the counters above (of every process, as ``/metrics``), so the page and ``/metrics`` cannot disagree. Reads
        files in the multiprocess mode: call it in a thread."""
        out: dict[str, dict[str, float | None]] = {}
        families = self._families(
            self.upstream_requests, self.stale_served, self.ratelimit_remaining, self.ratelimit_limit
        )

        def add(upstream: str, key: str, value: float) -> None:
            row = out.setdefault(upstream, {"pulls_left": None, "pull_limit": None})
            row[key] = (row.get(key) or 0.0) + value

        for sample in _samples(families, self.upstream_requests):
            add(sample.labels["upstream"], FAILURES.get(sample.labels["outcome"], "other"), sample.value)
        for sample in _samples(families, self.stale_served):
            add(sample.labels["upstream"], "stale_served", sample.value)
        for gauge, key in ((self.ratelimit_remaining, "pulls_left"), (self.ratelimit_limit, "pull_limit")):
            for sample in _samples(families, gauge):
                add(sample.labels["upstream"], key, sample.value)
        for row in out.values():
            row.pop("other", None)
            for key in ("errors", "rate_limited", "stale_served"):
                row.setdefault(key, 0.0)
        return dict(sorted(out.items()))

    def _families(self, *metrics: Counter | Gauge) -> dict[str, Metric]:
        """The families of ``metrics`` by name: this process's own, or in the multiprocess mode every process's."""
        names = {_name(metric) for metric in metrics}
        if self.shared_dir is None:
            found: Iterable[Metric] = (family for metric in metrics for family in metric.collect())
        else:
            found = HostCollector(self.shared_dir, self.repos, ()).collect()
        return {family.name: family for family in found if family.name in names}

    def deferred_summary(self) -> dict[str, dict[str, float]]:
        """Per upstream, the tags served without revalidation to save its pull quota, by reason (low_quota,
        rate_limited): ``mirror_ratelimit_deferred`` as the web page's upstreams page shows it (of every process;
        reads files in the multiprocess mode: call it in a thread)."""
        out: dict[str, dict[str, float]] = {}
        for sample in _samples(self._families(self.ratelimit_deferred), self.ratelimit_deferred):
            out.setdefault(sample.labels["upstream"], {})[sample.labels["reason"]] = sample.value
        return out

    def totals(self) -> dict[str, float]:
        """Running totals the web page's timeline samples: registry requests (``requests``), lookups by kind and
        result (``blob_hit``, ``tag_miss``...) and blob bytes served by source (``bytes_cache``, ``bytes_upstream``).
        Of every process, as ``/metrics``; reads files in the multiprocess mode: call it in a thread."""
        families = self._families(self.http_requests, self.cache_requests, self.blob_bytes_served)
        out: dict[str, float] = {"requests": 0.0, "bytes_cache": 0.0, "bytes_upstream": 0.0}
        for sample in _samples(families, self.http_requests):
            if registry_route(sample.labels["route"]):
                out["requests"] += sample.value
        for sample in _samples(families, self.cache_requests):
            key = f"{sample.labels['kind']}_{sample.labels['result']}"
            out[key] = out.get(key, 0.0) + sample.value
        for sample in _samples(families, self.blob_bytes_served):
            key = f"bytes_{sample.labels['source']}"
            out[key] = out.get(key, 0.0) + sample.value
        return out

    def prime(self, upstreams: Iterable[str]) -> None:
        """Create the usual label sets at zero, so that the first scrape already has every series: Prometheus's
        ``rate``/``increase`` cannot count the first increments of a series it has never seen at zero."""
        routes = (("manifest", "GET"), ("manifest_head", "HEAD"), ("blob", "GET"), ("blob_head", "HEAD"))
        for route, method in routes:
            self.http_duration.labels(route, method)
        for upstream in upstreams:
            for kind in ("blob", "manifest", "tag"):
                for result in ("hit", "miss", "stale", "revalidated"):
                    self.cache_requests.labels(upstream, kind, result)
            for source in ("cache", "upstream"):
                self.blob_bytes_served.labels(upstream, source)
            self.upstream_bytes_fetched.labels(upstream)
            self.coalesced_waiters.labels(upstream)
            for kind in ("manifest", "manifest_head", "blob", "blob_head", "tags"):
                self.upstream_duration.labels(upstream, kind)
                for outcome in ("ok", "unreachable", "error", "not_found", "unauthorized", "denied", "rate_limited"):
                    self.upstream_requests.labels(upstream, kind, outcome)
            for reason in ("unavailable", "rate_limited", "tags_list"):
                self.stale_served.labels(upstream, reason)
            for reason in ("low_quota", "rate_limited"):
                self.ratelimit_deferred.labels(upstream, reason)


# Upstream request outcomes the web page counts, and under which heading.
FAILURES = {"unreachable": "errors", "error": "errors", "rate_limited": "rate_limited"}


def _name(metric: Counter | Gauge) -> str:
    """A metric's family name (a counter's without ``_total``), as its files name it."""
    return next(iter(metric.describe())).name


def registry_route(route: str) -> bool:
    """Whether requests of this route are registry requests (not the web page, the admin API, metrics, probes or
    unknown paths: a browser's own /favicon.ico is none of the registry's)."""
    return not route.startswith(("ui_", "admin_")) and route not in ("metrics", "healthz", "readyz", "other")


def _samples(families: dict[str, Metric], metric: Counter | Gauge) -> Iterator[Sample]:
    """The current values of a labelled counter (its ``_total`` samples) or gauge."""
    family = families.get(_name(metric))
    for sample in family.samples if family else ():
        if not sample.name.endswith("_created"):
            yield sample
