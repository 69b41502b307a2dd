"""``/metrics`` for the whole host: two real mirror processes on one data dir share one
``PROMETHEUS_MULTIPROC_DIR`` (as the workers of ``mirror serve --workers N`` do), in front of a real Distribution
registry behind nginx (Docker Hub's ``ratelimit-*`` headers; a throttled twin to hold fetches open). Whichever
process takes the scrape, the counters are the sums of the requests made over both; the gauges of work under way
are the sums of both processes', and a dead process's drop out once ``mark_process_dead`` is called for it while
its counters stay; every metric the dashboard queries is still there, with the labels of one process.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from mirror.metrics import Metrics
from mirror.metrics.collectors import REPO_REQUESTS, REPO_SERVED, top_repos
from tests.integration.test_dashboard import dashboard_queries
from tests.support.ops import (
    COORDINATED,
    Mirror,
    blob_files,
    mirror_env,
    start_nginx,
    start_registry,
    wait_until,
)
from tests.support.plain_http import pull, push_blob, push_random_image, sha256

pytestmark = pytest.mark.integration
KiB, MiB = 2**10, 2**20
QUOTA = 'add_header ratelimit-limit "100;w=21600" always;\nadd_header ratelimit-remaining "76;w=21600" always;\n'

Series = tuple[str, frozenset[tuple[str, str]]]  # (sample name, labels)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    work = tmp_path_factory.mktemp("multiprocess")
    registry, url = start_registry(work / "registry")
    quota, quota_url = start_nginx(work / "nginx-quota", url, directives=QUOTA)
    slow, slow_url = start_nginx(work / "nginx-slow", url, throttle="1m")  # 4 MiB: ~4 s
    try:
        yield {"url": url, "quota": quota_url, "slow": slow_url}
    finally:
        slow.stop()
        quota.stop()
        registry.stop()


def shared(tmp_path: Path) -> dict[str, str]:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    return {"PROMETHEUS_MULTIPROC_DIR": str(directory)}


def two_mirrors(tmp_path: Path, upstream: str, env: dict[str, str]) -> tuple[Mirror, Mirror]:
    first = Mirror(tmp_path / "data", upstream, entry=COORDINATED, env=env)
    try:
        return first, Mirror(tmp_path / "data", upstream, entry=COORDINATED, env=env)
    except BaseException:
        first.stop()
        raise


def scrape(mirror: Mirror) -> dict[Series, float]:
    """Every sample of ``/metrics`` but those of the scrapes themselves (each one counts itself)."""
    found: dict[Series, float] = {}
    for family in text_string_to_metric_families(mirror.metrics()):
        for sample in family.samples:
            if sample.labels.get("route") != "metrics":
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def total(samples: dict[Series, float], name: str, **labels: str) -> float:
    """The sum of the ``name`` samples whose labels include ``labels`` (over the rest, e.g. ``upstream``)."""
    want = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and want <= have)


def counters(samples: dict[Series, float]) -> dict[Series, float]:
    """The counters and histograms: what comes from the processes' files alone, whichever process renders it."""
    return {k: v for k, v in samples.items() if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""


def test_requests_spread_over_two_processes_are_summed_by_either_scrape(
    upstream: dict[str, str], tmp_path: Path
) -> None:
    x, y = os.urandom(40 * KiB), os.urandom(24 * KiB)
    dx, dy = push_blob(upstream["url"], "library/x", x), push_blob(upstream["url"], "library/y", y)
    first, second = two_mirrors(tmp_path, upstream["quota"], shared(tmp_path))
    try:
        script = [  # (mirror, path, status, body): each blob is a miss on one process, then hits on both
            (first, f"/v2/library/x/blobs/{dx}", 200, x),
            (second, f"/v2/library/x/blobs/{dx}", 200, x),
            (second, f"/v2/library/x/blobs/{dx}", 200, x),
            (second, f"/v2/library/y/blobs/{dy}", 200, y),
            (first, f"/v2/library/y/blobs/{dy}", 200, y),
            (first, "/v2/", 200, b"{}"),
            (second, "/v2/", 200, b"{}"),
            (first, "/v2/library/nothere/manifests/latest", 404, b""),
        ]
        for mirror, path, status, body in script:
            got = get(mirror.url + path)
            assert got[0] == status and (not body or got[1] == body), path
            if body in (x, y):  # stored just after its client has it: the next GET of it is a hit
                stored = sha256(body)
                wait_until(lambda: stored in blob_files(tmp_path / "data"), what="the blob stored")  # noqa: B023
        want = {
            ("mirror_http_requests_total", "blob", "200"): 5,
            ("mirror_http_requests_total", "base", "200"): 2,
            ("mirror_http_requests_total", "manifest", "404"): 1,
        }

        def requests(samples: dict[Series, float]) -> dict[tuple[str, str, str], float]:
            return {k: total(samples, k[0], route=k[1], method="GET", status=k[2]) for k in want}

        # A response's last bytes can reach the client before the request is counted: wait for the counts.
        wait_until(lambda: requests(scrape(first)) == want, within=10, what="every request counted")
        one, two = scrape(first), scrape(second)
        assert counters(one) == counters(two), "both processes answer the same sums"
        for samples in (one, two):
            assert requests(samples) == want
            assert total(samples, "mirror_cache_requests_total", kind="blob", result="miss") == 2
            assert total(samples, "mirror_cache_requests_total", kind="blob", result="hit") == 3
            assert total(samples, "mirror_upstream_bytes_fetched_total") == len(x) + len(y)
            assert total(samples, "mirror_blob_bytes_served_total", source="upstream") == len(x) + len(y)
            assert total(samples, "mirror_blob_bytes_served_total", source="cache") == 2 * len(x) + len(y)
            assert total(samples, "mirror_http_request_duration_seconds_count", route="blob") == 5
            hits = {
                dict(labels)["repo"]: value
                for (name, labels), value in samples.items()
                if name == "mirror_repo_cache_requests_total" and ("result", "hit") in labels
            }
            assert {repo.rpartition("/")[2]: n for repo, n in hits.items() if n} == {"x": 2, "y": 1}
            # The quota both processes heard once: the latest announcement, not a sum per process.
            assert total(samples, "mirror_upstream_ratelimit_remaining") == 76
            assert not [name for name, labels in samples if any(k == "pid" for k, _ in labels)]
    finally:
        first.stop()
        second.stop()


class Reader(threading.Thread):
    """A client reading a blob through the mirror as it arrives; ``received`` counts the bytes so far."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.received = 0
        self.digest = ""
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        hasher = hashlib.sha256()
        try:
            with urllib.request.urlopen(self.url, timeout=60) as resp:
                while chunk := resp.read1(64 * KiB):
                    hasher.update(chunk)
                    self.received += len(chunk)
            self.digest = "sha256:" + hasher.hexdigest()
        except BaseException as exc:  # the connection cut when its process is killed
            self.error = exc


def test_gauges_of_work_under_way_are_summed_and_a_dead_process_drops_out(
    upstream: dict[str, str], tmp_path: Path
) -> None:
    p, q = os.urandom(4 * MiB), os.urandom(4 * MiB)
    dp, dq = push_blob(upstream["url"], "library/p", p), push_blob(upstream["url"], "library/q", q)
    env = shared(tmp_path)
    first, second = two_mirrors(tmp_path, upstream["slow"], env)
    try:
        on_first = Reader(f"{first.url}/v2/library/p/blobs/{dp}")
        on_second = Reader(f"{second.url}/v2/library/q/blobs/{dq}")
        wait_until(lambda: on_first.received > 0 and on_second.received > 0, what="both fetches streaming")
        first_streamed = on_first.received  # before the scrape that writes the first process's counts
        # One fetch each, held open by the throttled upstream; each process writes its figures within a second.
        wait_until(
            lambda: [total(scrape(m), "mirror_inflight_fetches") for m in (first, second)] == [2, 2],
            within=10,
            what="both fetches seen by both processes",
        )
        for mirror in (first, second):
            assert total(scrape(mirror), "mirror_cache_pending_bytes") == len(p) + len(q)
        first.kill9()
        assert total(scrape(second), "mirror_inflight_fetches") == 2, "a killed process's gauge stays until"
        mark_process_dead(first.proc.pid, env["PROMETHEUS_MULTIPROC_DIR"])  # type: ignore[no-untyped-call]  # unannotated
        streamed = on_second.received  # read before the scrape: the second process had fetched at least this
        samples = scrape(second)
        assert total(samples, "mirror_inflight_fetches") == 1
        assert total(samples, "mirror_cache_pending_bytes") == len(q)
        # Its counters stay as it last wrote them (a scrape writes the scraping process's counts; a SIGKILL loses
        # at most the last second's): the miss it counted, the upstream GET it made, the bytes it fetched (at least
        # what its client had received before that scrape).
        assert total(samples, "mirror_cache_requests_total", kind="blob", result="miss") == 2
        assert total(samples, "mirror_upstream_requests_total", kind="blob", outcome="ok") == 2
        assert total(samples, "mirror_upstream_bytes_fetched_total") >= streamed + first_streamed
        on_second.join(60)
        on_first.join(10)
        assert on_second.digest == dq and on_first.received < len(p)  # its client was cut
        wait_until(lambda: total(scrape(second), "mirror_inflight_fetches") == 0, what="the fetch ended")
        assert total(scrape(second), "mirror_cache_pending_bytes") == 0
    finally:
        first.stop()
        second.stop()


def session(mirror: Mirror, registry: str) -> None:
    """Pushes to the upstream, then pulls through ``mirror``: a miss, then hits, then a 404."""
    push_random_image(registry, "library/dash", "latest", [os.urandom(8 * KiB), os.urandom(16 * KiB)])
    pull(mirror.url, "dash", "latest")
    pull(mirror.url, "dash", "latest")
    assert get(mirror.url + "/v2/library/nothere/manifests/latest")[0] == 404


def exported(mirror: Mirror) -> tuple[set[str], set[tuple[str, frozenset[str]]]]:
    """The sample names ``/metrics`` shows, and the label names of each series (the label values aside)."""
    samples = scrape(mirror)
    names = {name for name, _ in samples}
    return names, {(name, frozenset(k for k, _ in labels)) for name, labels in samples if not name.endswith("_created")}


def test_every_metric_the_dashboard_queries_is_exported_with_the_same_labels(
    upstream: dict[str, str], tmp_path: Path
) -> None:
    queried = {name for _, expr in dashboard_queries() for name in re.findall(r"\bmirror_[a-z_]+", expr)}
    alone = Mirror(tmp_path / "alone", upstream["quota"])
    host = Mirror(tmp_path / "host", upstream["quota"], env=shared(tmp_path))
    try:
        session(alone, upstream["url"])
        session(host, upstream["url"])
        names, series = exported(host)
        assert sorted(queried - names) == [], "queried by the dashboard, not exported in multiprocess mode"
        one_process = exported(alone)
        assert series == one_process[1], "the same series and label names as one process alone"
        # The same names but the _created ones, which multiprocess mode does not keep (no panel reads them).
        assert names == {name for name in one_process[0] if not name.endswith("_created")}
    finally:
        alone.stop()
        host.stop()


LATE = """
import os, sys
import mirror.app  # the package first, as a supervisor imports it before it sets the variable for its workers
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from mirror.metrics import Metrics
from mirror.metrics.collectors import REPO_REQUESTS, REPO_SERVED, top_repos
metrics = Metrics()
metrics.http_requests.labels("blob", "GET", "200").inc(3)
metrics.inflight_fetches.inc()
"""


@pytest.mark.parametrize("setting", ["before import", "after import"])
def test_the_variable_counts_when_metrics_are_built_not_when_imported(tmp_path: Path, setting: str) -> None:
    env = shared(tmp_path)
    code = (
        LATE if setting == "after import" else LATE.replace('os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]', "")
    )
    subprocess.run(
        [sys.executable, "-c", code, env["PROMETHEUS_MULTIPROC_DIR"]],
        check=True,
        env={**mirror_env(), **(env if setting == "before import" else {})},
        timeout=60,
    )
    files = MultiProcessCollector.merge(glob.glob(f"{env['PROMETHEUS_MULTIPROC_DIR']}/*.db"))  # type: ignore[no-untyped-call]  # unannotated
    values = {(s.name, s.labels.get("route", "")): s.value for family in files for s in family.samples}
    assert values[("mirror_http_requests_total", "blob")] == 3
    assert values[("mirror_inflight_fetches", "")] == 1


def test_a_missing_directory_is_refused_when_metrics_are_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="is not a directory"):
        Metrics()


SUMMARY = """
import json, sys
from mirror.metrics import Metrics
from mirror.metrics.collectors import REPO_REQUESTS, REPO_SERVED, top_repos
metrics = Metrics()
metrics.prime(["docker.io"])
metrics.upstream_requests.labels("docker.io", "blob", sys.argv[1]).inc(2)
metrics.ratelimit_remaining.labels("docker.io").set(float(sys.argv[2]))
print(json.dumps(metrics.upstream_summary()["docker.io"]))
"""


def test_the_web_pages_upstream_figures_are_the_hosts(tmp_path: Path) -> None:
    env = {**mirror_env(), **shared(tmp_path)}

    def process(outcome: str, remaining: int) -> dict[str, float]:
        run = subprocess.run(
            [sys.executable, "-c", SUMMARY, outcome, str(remaining)], env=env, capture_output=True, check=True
        )
        return dict(json.loads(run.stdout))

    process("unreachable", 50)
    process("rate_limited", 40)
    seen = process("error", 30)  # this one's own counts and the two others', the latest quota announced
    assert (seen["errors"], seen["rate_limited"], seen["pulls_left"]) == (4, 2, 30)


def test_the_top_repositories_are_picked_from_the_sums_of_every_process() -> None:
    requests = CounterMetricFamily(REPO_REQUESTS, "", labels=["repo", "kind", "result"])
    served = CounterMetricFamily(REPO_SERVED, "", labels=["repo", "source"])
    for repo, hits in (("a", 5), ("b", 3), ("c", 4), ("kept", 1)):
        requests.add_metric([repo, "blob", "hit"], hits)
        served.add_metric([repo, "cache"], 10 * hits)
    other = CounterMetricFamily("mirror_http_requests", "", labels=["route"])
    other.add_metric(["blob"], 7)
    cut = {f.name: f for f in top_repos([requests, served, other], 2, frozenset({"kept", "absent"}))}
    assert [s.labels["repo"] for s in cut[REPO_REQUESTS].samples] == ["a", "c", "kept"]
    assert [s.labels["repo"] for s in cut[REPO_SERVED].samples] == ["a", "c", "kept"]
    assert [s.value for s in cut["mirror_http_requests"].samples] == [7]
