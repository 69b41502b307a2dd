"""The metrics that are not plain counters, histograms and gauges: figures read when ``/metrics`` is scraped
(the cache's fill, the upload sessions on disk), the per-repository counters with their bounded label set, and
the requests-per-minute ring of the web page."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

REPO_REQUESTS = "mirror_repo_cache_requests"
REPO_REQUESTS_HELP = "Cache lookups by repository (top repositories and the allowlist only), kind and result."
REPO_SERVED = "mirror_repo_blob_bytes_served"
REPO_SERVED_HELP = "Blob bytes sent to clients by repository (top repositories and the allowlist only) and source."


class Timeline:
    """Running totals (``Metrics.totals``) sampled a few times a minute, kept for the last ``slots`` minutes: the web
    page's per-minute series and last-hour figures are differences of samples, so requests pay nothing for them
    and, in the multiprocess mode, they cover every process. Memory is fixed: one sample per minute."""

    def __init__(self, slots: int = 60):
        self.slots = slots
        self._samples: dict[int, dict[str, float]] = {}  # minute -> the totals first seen in it

    def add(self, minute: int, totals: Mapping[str, float]) -> None:
        self._samples.setdefault(minute, dict(totals))
        for old in [m for m in self._samples if m < minute - self.slots]:
            del self._samples[old]

    def per_minute(self, key: str, minute: int, now: Mapping[str, float]) -> list[float]:
        """How much ``key`` grew in each of the last ``slots`` minutes, oldest first, the current minute (so far)
        last; a minute with no sample at its start shows 0 and its growth goes to the minute before."""
        out = []
        for m in range(minute - self.slots + 1, minute + 1):
            start = self._samples.get(m)
            end = next((self._samples[n] for n in range(m + 1, minute + 1) if n in self._samples), now)
            out.append(max(0.0, end.get(key, 0.0) - start.get(key, 0.0)) if start is not None else 0.0)
        return out

    def last_hour(self, minute: int, now: Mapping[str, float]) -> dict[str, float]:
        """How much every total grew over the last ``slots`` minutes (since the oldest sample, if younger)."""
        kept = [m for m in self._samples if m > minute - self.slots]
        base = self._samples[min(kept)] if kept else {}
        return {key: max(0.0, value - base.get(key, 0.0)) for key, value in now.items()}


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    size: int  # bytes stored (each digest once)
    limit: int  # --cache-size; 0 = no limit
    pending: int  # bytes of fetches under way
    entries: dict[str, int] = field(default_factory=dict)  # by kind
    pinned: int = 0  # bytes protected by pins and pushes


class CacheCollector(Collector):
    """Cache fill gauges, read at scrape time from whatever ``source`` the app wires in (the usage table).

    Without ``pending`` the pending bytes are left out: with several processes each counts its own fetches in a
    gauge of its own (``Metrics.cache_pending``), summed at the scrape."""

    def __init__(self, pending: bool = True) -> None:
        self.source: Callable[[], CacheSnapshot] | None = None
        self.pending = pending

    def frozen(self) -> CacheCollector:
        """The same gauges with the figures of now: taken where ``source`` may be read (the event loop), then
        collected anywhere (a thread)."""
        copy = CacheCollector(self.pending)
        if self.source is not None:
            snap = self.source()
            copy.source = lambda: snap
        return copy

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        snap = self.source()
        yield GaugeMetricFamily("mirror_cache_size_bytes", "Bytes of content in the cache.", value=snap.size)
        yield GaugeMetricFamily(
            "mirror_cache_limit_bytes", "The configured --cache-size (0: no limit).", value=snap.limit
        )
        if self.pending:
            yield GaugeMetricFamily(PENDING, PENDING_HELP, value=snap.pending)
        yield GaugeMetricFamily(
            "mirror_cache_protected_bytes", "Bytes eviction may not remove (pinned or pushed).", value=snap.pinned
        )
        entries = GaugeMetricFamily("mirror_cache_entries", "Digests in the cache, by kind.", labels=["kind"])
        for kind, count in sorted(snap.entries.items()):
            entries.add_metric([kind], count)
        yield entries


PENDING = "mirror_cache_pending_bytes"
PENDING_HELP = "Bytes of upstream fetches under way, not yet in the cache."


class SessionsCollector(Collector):
    """``mirror_upload_sessions``: the sessions open on disk, counted at scrape time by ``source`` (it reads the
    sessions directory, which every process on the data dir shares)."""

    def __init__(self) -> None:
        self.source: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "mirror_upload_sessions",
            "Push upload sessions open on disk (started, not yet completed, cancelled or expired).",
            value=self.source(),
        )


@dataclass(frozen=True, slots=True)
class SharedRepoCounters:
    """The per-repository counters as prometheus-client counters, for the multiprocess mode: every process
    writes its counts to its file and the scrape sums them (``top_repos`` then keeps the exported ones)."""

    requests: Counter
    served: Counter

    @classmethod
    def create(cls) -> SharedRepoCounters:
        # registry=None: they are not collected from this process's memory, only from the files.
        return cls(
            Counter(REPO_REQUESTS, REPO_REQUESTS_HELP, ["repo", "kind", "result"], registry=None),
            Counter(REPO_SERVED, REPO_SERVED_HELP, ["repo", "source"], registry=None),
        )


class RepoStats(Collector):
    """Per-repository hit/miss and byte counters with bounded label cardinality.

    Every repository is counted in memory (at most ``max_tracked``; the least active are dropped past that),
    but only the ``top`` most requested ones plus an allowlist are exported as ``repo`` labels: the scrape stays
    small however many repositories clients pull. ``drain`` hands the increments since the last call to the
    usage table, which keeps totals across restarts for ``mirror stats``.

    With ``shared`` counters (the multiprocess mode) each count is also written there, for the first
    ``max_tracked`` repositories this process sees (a file cannot drop a series, so that is its bound); the
    scrape picks the top ones from the sums of every process (``top_repos``), not from this process's memory.
    """

    def __init__(
        self,
        top: int = 20,
        allowlist: Iterable[str] = (),
        max_tracked: int = 10000,
        shared: SharedRepoCounters | None = None,
    ):
        self.top = top
        self.allowlist = frozenset(allowlist)
        self.max_tracked = max_tracked
        self.shared = shared
        self._shared_repos: set[str] = set()
        self._requests: dict[str, Tally[tuple[str, str]]] = {}
        self._bytes: dict[str, Tally[str]] = {}
        self._deltas: Tally[tuple[str, str]] = Tally()

    def configure(self, top: int, allowlist: Iterable[str]) -> None:
        self.top = top
        self.allowlist = frozenset(allowlist)

    def count(self, repo: str, kind: str, result: str) -> None:
        self._requests.setdefault(repo, Tally())[(kind, result)] += 1
        self._deltas[(repo, f"{kind}_{result}")] += 1
        if self.shared is not None and self._shares(repo):
            self.shared.requests.labels(repo, kind, result).inc()
        if len(self._requests) > 2 * self.max_tracked:
            self._prune()

    def served(self, repo: str, source: str, size: int) -> None:
        self._bytes.setdefault(repo, Tally())[source] += size
        self._deltas[(repo, f"bytes_{source}")] += size
        if self.shared is not None and self._shares(repo):
            self.shared.served.labels(repo, source).inc(size)

    def _shares(self, repo: str) -> bool:
        if repo in self._shared_repos:
            return True
        if len(self._shared_repos) >= self.max_tracked:
            return False
        self._shared_repos.add(repo)
        return True

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
        requests = CounterMetricFamily(REPO_REQUESTS, REPO_REQUESTS_HELP, labels=["repo", "kind", "result"])
        served = CounterMetricFamily(REPO_SERVED, REPO_SERVED_HELP, labels=["repo", "source"])
        for repo in self.exported():
            for (kind, result), value in sorted(self._requests[repo].items()):
                requests.add_metric([repo, kind, result], value)
            for source, value in sorted(self._bytes.get(repo, Tally()).items()):
                served.add_metric([repo, source], value)
        yield requests
        yield served


def top_repos(families: Iterable[Metric], top: int, allowlist: frozenset[str]) -> Iterator[Metric]:
    """The per-repository families summed over every process, cut to the ``top`` most requested repositories
    plus the allowlist, as ``RepoStats.collect`` cuts its own; other families pass unchanged."""
    families = list(families)
    totals: Tally[str] = Tally()
    for family in families:
        if family.name == REPO_REQUESTS:
            for sample in family.samples:
                totals[sample.labels["repo"]] += int(sample.value)
    ranked = sorted(totals, key=lambda repo: (-totals[repo], repo))
    keep = set(ranked[:top]) | (allowlist & set(totals))
    for family in families:
        if family.name in (REPO_REQUESTS, REPO_SERVED):
            family.samples = sorted((s for s in family.samples if s.labels["repo"] in keep), key=lambda s: _order(s))
        yield family


def _order(sample: Sample) -> tuple[str, ...]:
    return tuple(sample.labels[k] for k in sorted(sample.labels))
