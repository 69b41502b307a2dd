"""Every Prometheus metric of the mirror, in one place.

Conventions: prefix ``mirror_``, base units (``_bytes``, ``_seconds``), counters end in ``_total``, small closed
label sets (never a label per digest or per tag). Names say which way bytes flow: ``served`` is mirror -> client,
``fetched`` is upstream -> mirror. "Bytes saved" is ``mirror_blob_bytes_served_total{source="cache"}``.

A ``Metrics`` object owns its own ``CollectorRegistry`` so that several apps (tests) never share state.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

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
        self.ratelimit_deferred = Counter(
            "mirror_ratelimit_deferred",
            "Tags served from the cache without revalidation because the upstream's pull quota was low or it had "
            "answered 429, by reason (low_quota, rate_limited).",
            ["upstream", "reason"],
            registry=r,
        )
        # --- local pushes (mirror.push, mirror.access, mirror.notify) -------------------------------------------
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
        self.cache = CacheCollector()
        r.register(self.cache)
        self.repos = RepoStats()
        r.register(self.repos)
        self.per_minute = RequestRate()  # registry requests per minute over the last hour, for the web page

    def upstream_summary(self) -> dict[str, dict[str, float | None]]:
        """Per upstream, what the web page shows of its health: pulls left in its quota window (None until it
        announced one), stale answers served, requests that failed (unreachable or an error) and 429s. Read from
        the counters above, so the page and ``/metrics`` cannot disagree."""
        out: dict[str, dict[str, float | None]] = {}

        def add(upstream: str, key: str, value: float) -> None:
            row = out.setdefault(upstream, {"pulls_left": None, "pull_limit": None})
            row[key] = (row.get(key) or 0.0) + value

        for sample in _samples(self.upstream_requests):
            add(sample.labels["upstream"], FAILURES.get(sample.labels["outcome"], "other"), sample.value)
        for sample in _samples(self.stale_served):
            add(sample.labels["upstream"], "stale_served", sample.value)
        for gauge, key in ((self.ratelimit_remaining, "pulls_left"), (self.ratelimit_limit, "pull_limit")):
            for sample in _samples(gauge):
                add(sample.labels["upstream"], key, sample.value)
        for row in out.values():
            row.pop("other", None)
            for key in ("errors", "rate_limited", "stale_served"):
                row.setdefault(key, 0.0)
        return dict(sorted(out.items()))

    def deferred_summary(self) -> dict[str, dict[str, float]]:
        """Per upstream, the tags served without revalidation to save its pull quota, by reason (low_quota,
        rate_limited): ``mirror_ratelimit_deferred`` as the web page's upstreams page shows it."""
        out: dict[str, dict[str, float]] = {}
        for sample in _samples(self.ratelimit_deferred):
            out.setdefault(sample.labels["upstream"], {})[sample.labels["reason"]] = sample.value
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


def _samples(metric: Counter | Gauge) -> Iterator[Sample]:
    """The current values of a labelled counter (its ``_total`` samples) or gauge."""
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                yield sample


class RequestRate:
    """Requests per minute over the last ``slots`` minutes: a ring of counters indexed by the minute. Counting is
    an increment (and, once a minute, zeroing the slots that passed); memory is fixed."""

    def __init__(self, slots: int = 60):
        self.slots = slots
        self._counts = [0] * slots
        self._minute = 0  # the minute (monotonic clock // 60) the newest slot holds

    def count(self, now: float) -> None:
        minute = int(now // 60)
        if minute != self._minute:
            self._advance(minute)
        self._counts[minute % self.slots] += 1

    def last(self, now: float) -> list[int]:
        """The counts, oldest minute first; the last one is the current (partial) minute."""
        minute = int(now // 60)
        if minute != self._minute:
            self._advance(minute)
        start = minute + 1
        return [self._counts[(start + i) % self.slots] for i in range(self.slots)]

    def _advance(self, minute: int) -> None:
        for passed in range(self._minute + 1, min(minute, self._minute + self.slots) + 1):
            self._counts[passed % self.slots] = 0
        if minute - self._minute > self.slots:
            self._counts = [0] * self.slots
        self._minute = minute


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    size: int  # bytes stored (each digest once)
    limit: int  # --cache-size; 0 = no limit
    pending: int  # bytes of fetches under way
    entries: dict[str, int] = field(default_factory=dict)  # by kind
    pinned: int = 0  # bytes protected by pins and pushes


class CacheCollector(Collector):
    """Cache fill gauges, read at scrape time from whatever ``source`` the app wires in (the usage table)."""

    def __init__(self) -> None:
        self.source: Callable[[], CacheSnapshot] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        snap = self.source()
        yield GaugeMetricFamily("mirror_cache_size_bytes", "Bytes of content in the cache.", value=snap.size)
        yield GaugeMetricFamily(
            "mirror_cache_limit_bytes", "The configured --cache-size (0: no limit).", value=snap.limit
        )
        yield GaugeMetricFamily(
            "mirror_cache_pending_bytes",
            "Bytes of upstream fetches under way, not yet in the cache.",
            value=snap.pending,
        )
        yield GaugeMetricFamily(
            "mirror_cache_protected_bytes", "Bytes eviction may not remove (pinned or pushed).", value=snap.pinned
        )
        entries = GaugeMetricFamily("mirror_cache_entries", "Digests in the cache, by kind.", labels=["kind"])
        for kind, count in sorted(snap.entries.items()):
            entries.add_metric([kind], count)
        yield entries


class RepoStats(Collector):
    """Per-repository hit/miss and byte counters with bounded label cardinality.

    Every repository is counted in memory (at most ``max_tracked``; the least active are dropped past that),
    but only the ``top`` most requested ones plus an allowlist are exported as ``repo`` labels: the scrape stays
    small however many repositories clients pull. ``drain`` hands the increments since the last call to the
    usage table, which keeps totals across restarts for ``mirror stats``.
    """

    def __init__(self, top: int = 20, allowlist: Iterable[str] = (), max_tracked: int = 10000):
        self.top = top
        self.allowlist = frozenset(allowlist)
        self.max_tracked = max_tracked
        self._requests: dict[str, Tally[tuple[str, str]]] = {}
        self._bytes: dict[str, Tally[str]] = {}
        self._deltas: Tally[tuple[str, str]] = Tally()

    def configure(self, top: int, allowlist: Iterable[str]) -> None:
        self.top = top
        self.allowlist = frozenset(allowlist)

    def count(self, repo: str, kind: str, result: str) -> None:
        self._requests.setdefault(repo, Tally())[(kind, result)] += 1
        self._deltas[(repo, f"{kind}_{result}")] += 1
        if len(self._requests) > 2 * self.max_tracked:
            self._prune()

    def served(self, repo: str, source: str, size: int) -> None:
        self._bytes.setdefault(repo, Tally())[source] += size
        self._deltas[(repo, f"bytes_{source}")] += size

    def drain(self) -> dict[tuple[str, str], int]:
        deltas, self._deltas = dict(self._deltas), Tally()
        return deltas

    def _prune(self) -> None:
        keep = set(self._ranked()[: self.max_tracked]) | self.allowlist
        self._requests = {r: c for r, c in self._requests.items() if r in keep}
        self._bytes = {r: c for r, c in self._bytes.items() if r in keep}

    def _ranked(self) -> list[str]:
        return sorted(self._requests, key=lambda r: sum(self._requests[r].values()), reverse=True)

    def exported(self) -> list[str]:
        return sorted(set(self._ranked()[: self.top]) | (self.allowlist & set(self._requests)))

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "mirror_repo_cache_requests",
            "Cache lookups by repository (top repositories and the allowlist only), kind and result.",
            labels=["repo", "kind", "result"],
        )
        served = CounterMetricFamily(
            "mirror_repo_blob_bytes_served",
            "Blob bytes sent to clients by repository (top repositories and the allowlist only) and source.",
            labels=["repo", "source"],
        )
        for repo in self.exported():
            for (kind, result), value in sorted(self._requests[repo].items()):
                requests.add_metric([repo, kind, result], value)
            for source, value in sorted(self._bytes.get(repo, Tally()).items()):
                served.add_metric([repo, source], value)
        yield requests
        yield served
