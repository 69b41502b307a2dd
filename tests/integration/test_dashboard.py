"""The Grafana dashboard, proven against the real metrics: a real Prometheus (Debian ``prometheus``) scrapes a
mirror with two workers (``--workers 2``: one scrape answers for both) that served a scripted pull session, and every PromQL expression of ``grafana/dashboards/mirror.json``
is evaluated through Prometheus's HTTP API. Each must parse and return data.

The session (real registry, nginx in front adding Docker Hub's ``ratelimit-*`` headers and two fault switches,
skopeo and plain HTTP pulls) produces every kind of event the dashboard shows: misses, hits, coalesced fetches,
evictions past ``--cache-size``, a stale answer while the upstream fails, a 429, a 404.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.ops import (
    REPO_ROOT,
    Mirror,
    Service,
    free_port,
    record_figures,
    require,
    start_nginx,
    start_registry,
    wait_until,
)
from tests.support.plain_http import pull, push_random_image

pytestmark = pytest.mark.integration
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "mirror.json"
# What Grafana substitutes before it sends a query.
VARIABLES = {"$__rate_interval": "1m", "$__range": "10m", "$__interval": "15s", "$upstream": ".*"}
MiB = 2**20


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target in the dashboard."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def substitute(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    return expr


def query(prometheus: str, expr: str) -> dict[str, Any]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def values(answer: dict[str, Any]) -> list[float]:
    data = answer.get("data", {})
    if data.get("resultType") == "scalar":
        return [float(data["result"][1])]
    return [float(sample["value"][1]) for sample in data.get("result", [])]


def start_prometheus(workdir: Path, target: str) -> tuple[Service, str]:
    binary = require("prometheus")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: mirror\n    static_configs:\n      - targets: ['{target}']\n"
    )
    service = Service(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        workdir / "prometheus.log",
    )
    url = f"http://127.0.0.1:{port}"
    service.wait_ready(url + "/-/ready", within=60)
    return service, url


def skopeo_pull(workdir: Path, mirror: str, name: str) -> None:
    skopeo = require("skopeo")
    policy = workdir / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    target = workdir / f"skopeo-{name.replace('/', '-')}"
    subprocess.run(
        [
            skopeo,
            "--policy",
            str(policy),
            "copy",
            "--src-tls-verify=false",
            f"docker://{mirror}/{name}",
            f"dir:{target}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_every_dashboard_query_returns_data(tmp_path: Path) -> None:
    registry, registry_url = start_registry(tmp_path / "registry")
    down = tmp_path / "flaky-down"
    nginx, upstream = start_nginx(
        tmp_path / "nginx",
        registry_url,
        directives=(
            'add_header ratelimit-limit "100;w=21600" always;\nadd_header ratelimit-remaining "76;w=21600" always;\n'
        ),
        throttle="16m",  # a 2 MiB layer takes ~125 ms: concurrent pulls of it coalesce
        locations=(
            "location /v2/library/limited/ { add_header Retry-After 60 always;"
            ' return 429 \'{"errors":[{"code":"TOOMANYREQUESTS","message":"rate limited"}]}\'; }\n'
            f"location /v2/library/flaky/ {{ if (-f {down}) {{ return 503; }} proxy_pass {registry_url}; }}"
        ),
    )
    services: list[Service] = [registry, nginx]
    try:
        base = os.urandom(64 * 2**10)
        for i in range(6):
            push_random_image(registry_url, f"library/app{i}", "latest", [base, os.urandom(512 * 2**10)])
        push_random_image(registry_url, "library/big", "latest", [os.urandom(2 * MiB)])
        push_random_image(registry_url, "library/flaky", "latest", [os.urandom(32 * 2**10)])
        mirror = Mirror(
            tmp_path / "data", upstream, "--cache-size", "3MiB", "--tag-ttl", "0", "--upstream-timeout", "5",
            "--workers", "2", log=tmp_path / "mirror.log",
        )  # fmt: skip
        services.append(mirror)
        prometheus_service, prometheus = start_prometheus(tmp_path / "prometheus", mirror.url.removeprefix("http://"))
        services.append(prometheus_service)
        wait_until(lambda: values(query(prometheus, 'up{job="mirror"}')) == [1.0], within=60, what="a first scrape")

        # --- the scripted pull session ------------------------------------------------------------------------
        host = mirror.url.removeprefix("http://")
        for i in range(3):
            skopeo_pull(tmp_path, host, f"library/app{i}:latest")  # a real client, cold
        for i in range(3, 6):
            pull(mirror.url, f"app{i}", "latest")  # cold; past the cache size, so evictions
        threads = [threading.Thread(target=pull, args=(mirror.url, "big", "latest")) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for _ in range(3):
            pull(mirror.url, "big", "latest")  # warm: hits
        pull(mirror.url, "app5", "latest")
        pull(mirror.url, "flaky", "latest")
        down.write_text("down")
        pull(mirror.url, "flaky", "latest")  # the tag is revalidated, the upstream fails: a stale answer
        assert http_status(f"{mirror.url}/v2/limited/manifests/latest") == 429
        assert http_status(f"{mirror.url}/v2/nothere/manifests/latest") == 404

        # --- wait until Prometheus has the end of the session, twice (rate() needs two samples) --------------
        # Each worker writes its counts to the shared files within a second: compare with the mirror's own sum
        # at every look, until Prometheus has it too.
        def served() -> float:
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in mirror.metrics().splitlines()
                if line.startswith("mirror_http_requests_total{") and 'route="metrics"' not in line
            )

        wait_until(
            lambda: values(query(prometheus, 'sum(mirror_http_requests_total{route!="metrics"})')) == [served()],
            within=60,
            what="Prometheus scraped the session",
        )
        scrapes = values(query(prometheus, 'count_over_time(up{job="mirror"}[10m])'))[0]
        wait_until(
            lambda: values(query(prometheus, 'count_over_time(up{job="mirror"}[10m])'))[0] >= scrapes + 2,
            within=60,
            what="two more scrapes",
        )

        # --- every expression of the dashboard ------------------------------------------------------------------
        failures = []
        results: dict[str, list[float]] = {}
        for title, expr in dashboard_queries():
            answer = query(prometheus, substitute(expr))
            if answer.get("status") != "success":
                failures.append(f"{title}: {expr}: does not parse: {answer.get('error')}")
                continue
            finite = [v for v in values(answer) if not math.isnan(v)]
            if not finite:
                failures.append(f"{title}: {expr}: no data ({answer['data']})")
            results[f"{title} | {expr}"] = finite
        assert not failures, "\n".join(failures)

        def first(title: str) -> float:
            return next(v for k, v in results.items() if k.startswith(title + " |"))[0]

        def raw(expr: str) -> float:
            return values(query(prometheus, expr))[0]

        hits = raw('sum(mirror_cache_requests_total{kind="blob",result="hit"})')
        misses = raw('sum(mirror_cache_requests_total{kind="blob",result="miss"})')
        top = query(prometheus, "topk(5, sum by (repo) (mirror_repo_cache_requests_total))")["data"]["result"]
        record_figures(
            "dashboard",
            queries=len(results),
            panel_blob_hit_ratio=round(first("Blob hit ratio"), 4),
            panel_bytes_saved=round(first("Bytes saved")),
            panel_upstream_egress=round(first("Upstream egress")),
            panel_cache_fill=round(first("Cache fill"), 4),
            panel_hub_pulls_left=first("Docker Hub pulls left"),
            panel_stale_answers=round(first("Stale answers"), 3),
            blob_hits=hits,
            blob_misses=misses,
            counter_blob_hit_ratio=round(hits / (hits + misses), 4),
            counter_bytes_saved=raw('sum(mirror_blob_bytes_served_total{source="cache"})'),
            counter_bytes_from_upstream=raw('sum(mirror_blob_bytes_served_total{source="upstream"})'),
            counter_upstream_fetched=raw("sum(mirror_upstream_bytes_fetched_total)"),
            evictions=raw("sum(mirror_cache_evictions_total)"),
            coalesced_waiters=raw("sum(mirror_coalesced_waiters_total)"),
            stale=raw("sum(mirror_stale_served_total)"),
            upstream_429=raw('sum(mirror_upstream_requests_total{outcome="rate_limited"})'),
            top_repositories={r["metric"]["repo"]: float(r["value"][1]) for r in top},
        )
    finally:
        for service in reversed(services):
            service.stop()
