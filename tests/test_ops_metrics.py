"""Per-repository metrics keep label cardinality bounded; the admin layer sits where STYLE.md puts it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from mirror.metrics import Metrics, RepoStats, Timeline
from tests.test_layers import MODULES, area, imports


def exported(stats: RepoStats) -> set[str]:
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    return {line.split('repo="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'repo="' in line}


def test_only_the_top_repositories_and_the_allowlist_get_a_label() -> None:
    stats = RepoStats(top=3, allowlist=["docker.io/library/rare"], max_tracked=50)
    for n in range(200):  # 200 repositories, repo i asked i+1 times (capped to keep the test quick)
        for _ in range(min(n + 1, 20)):
            stats.count(f"docker.io/library/r{n:03d}", "blob", "hit")
    stats.count("docker.io/library/rare", "blob", "miss")
    names = exported(stats)
    assert len(names) == 4 and "docker.io/library/rare" in names
    assert len(stats._requests) <= 2 * 50 + 1  # memory stays bounded too


def test_drain_hands_over_increments_once() -> None:
    stats = RepoStats()
    stats.count("docker.io/library/a", "blob", "hit")
    stats.served("docker.io/library/a", "cache", 100)
    assert stats.drain() == {("docker.io/library/a", "blob_hit"): 1, ("docker.io/library/a", "bytes_cache"): 100}
    assert stats.drain() == {}


def test_primed_series_exist_at_zero() -> None:
    metrics = Metrics()
    metrics.prime(["docker.io"])
    text = generate_latest(metrics.registry).decode()
    assert 'mirror_cache_requests_total{kind="blob",result="hit",upstream="docker.io"} 0.0' in text
    assert 'mirror_cache_evictions_total{kind="manifest"} 0.0' in text


def test_admin_is_above_the_services_and_below_the_api() -> None:
    below = {"oci", "metrics", "config", "log", "storage", "upstream", "content", "pull", "push"}
    for module, tree in MODULES.items():
        targets = {area(i) for i in imports(tree) if i.startswith("mirror.")}
        if area(module) in below:
            assert "admin" not in targets, f"{module} imports mirror.admin"
        if area(module) == "admin":
            assert not targets & {"api", "app", "cli", "config"}, f"{module} imports {targets}"


def test_the_timeline_keeps_the_last_hour_of_samples_as_growth_per_minute() -> None:
    timeline = Timeline()
    for minute, requests in ((100, 0), (101, 3), (102, 4), (105, 6)):  # minutes 103 and 104: no sample
        timeline.add(minute, {"requests": requests})
        timeline.add(minute, {"requests": requests + 50})  # the first sample of a minute is its start
    counts = timeline.per_minute("requests", 105, {"requests": 10})
    assert len(counts) == 60
    assert counts[-6:] == [3, 1, 2, 0, 0, 4]  # oldest first; the current minute is its growth so far
    assert timeline.last_hour(105, {"requests": 10, "blob_hit": 2}) == {"requests": 10, "blob_hit": 2}
    timeline.add(170, {"requests": 30})  # an hour on: the old samples go
    assert len(timeline._samples) <= 61
    assert timeline.last_hour(170, {"requests": 31}) == {"requests": 1}
    assert sum(timeline.per_minute("requests", 170, {"requests": 31})) == 1


def test_totals_count_registry_requests_lookups_and_bytes() -> None:
    metrics = Metrics()
    for route in ("manifest", "blob", "blob", "ui_overview", "metrics", "admin_stats", "other", "readyz"):
        metrics.http_requests.labels(route, "GET", "200").inc()
    metrics.cache_requests.labels("docker.io", "blob", "hit").inc(3)
    metrics.cache_requests.labels("ghcr.io", "blob", "hit").inc()
    metrics.blob_bytes_served.labels("docker.io", "cache").inc(100)
    totals = metrics.totals()
    assert totals["requests"] == 3 and totals["blob_hit"] == 4 and totals["bytes_cache"] == 100
    assert totals["bytes_upstream"] == 0


def test_upstream_summary_reads_the_counters() -> None:
    metrics = Metrics()
    metrics.prime(["docker.io"])
    metrics.upstream_requests.labels("docker.io", "blob", "unreachable").inc(2)
    metrics.upstream_requests.labels("docker.io", "manifest", "error").inc()
    metrics.upstream_requests.labels("docker.io", "manifest", "rate_limited").inc(4)
    metrics.upstream_requests.labels("docker.io", "manifest", "ok").inc(9)
    metrics.stale_served.labels("docker.io", "rate_limited").inc()
    metrics.ratelimit_remaining.labels("docker.io").set(57)
    metrics.ratelimit_limit.labels("docker.io").set(100)
    assert metrics.upstream_summary() == {
        "docker.io": {"pulls_left": 57, "pull_limit": 100, "errors": 3, "rate_limited": 4, "stale_served": 1}
    }
