"""The web page in a real headless browser: Debian's ``chromium`` driven by Playwright (never a downloaded browser
build), against a real mirror in front of a real Distribution upstream after real pulls through it.

Every page visit fails on a console error, a request to any host but the mirror, or a layout wider than the
window, and leaves screenshots at desktop and phone widths under the test's temp dir. One browser serves the
whole module.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser
from prometheus_client.parser import text_string_to_metric_families

from tests.support.browser import DEMO_LAYERS as LAYERS
from tests.support.browser import demo_mirror, launch, visit
from tests.support.credentials import basic, make_htpasswd
from tests.support.ops import NO_UPSTREAM, Mirror, start_nginx, start_registry
from tests.support.plain_http import pull, push_random_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    with demo_mirror(tmp_path_factory.mktemp("ui")) as mirror:
        yield mirror


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def dotted(stats: dict[str, Any], name: str) -> Any:
    value: Any = stats
    for part in name.split("."):
        value = value[part]
    return value


def upstream_figures(metrics_text: str, upstream: str) -> dict[str, float | None]:
    """The overview's upstream row, computed independently from ``/metrics``."""
    out: dict[str, float | None] = {"errors": 0.0, "rate_limited": 0.0, "stale_served": 0.0, "pulls_left": None}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.labels.get("upstream") != upstream:
                continue
            if sample.name == "mirror_upstream_requests_total":
                outcome = sample.labels["outcome"]
                key = {"unreachable": "errors", "error": "errors", "rate_limited": "rate_limited"}.get(outcome)
                if key:
                    out[key] = (out[key] or 0.0) + sample.value
            elif sample.name == "mirror_stale_served_total":
                out["stale_served"] = (out["stale_served"] or 0.0) + sample.value
            elif sample.name == "mirror_upstream_ratelimit_remaining":
                out["pulls_left"] = sample.value
    return out


def counter(metrics: str, name: str, **labels: str) -> int:
    """The sum of a counter's series with these labels in a /metrics text."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rpartition(" ")[2])
    return int(total)


def test_overview_shows_what_admin_stats_says(browser: Browser, served: Mirror, tmp_path: Path) -> None:
    for shown in visit(browser, served.url + "/ui/", tmp_path, "overview"):
        assert shown.status == 200 and not shown.console_errors, shown.console_errors
        figures = shown.page.eval_on_selector_all(
            "main [data-stat]:not([data-upstream] *)", "els => els.map(e => [e.dataset.stat, e.dataset.value])"
        )
        stats = get_json(served.url + "/admin/v1/stats")
        assert stats["hit_ratio"]["blob"] == 0.5 and stats["bytes_served"]["cache"] > sum(map(len, LAYERS))
        names = {name for name, _ in figures}
        assert {"hit_ratio.blob", "hit_ratio.manifest", "hit_ratio.tag", "bytes_served.cache"} <= names
        assert {"bytes_served.upstream", "size_bytes", "limit_bytes", "high_watermark_bytes"} <= names
        for name, value in figures:
            assert json.loads(value) == dotted(stats, name), name
        row = shown.page.eval_on_selector_all(
            '[data-upstream="docker.io"] [data-stat]', "els => els.map(e => [e.dataset.stat, e.dataset.value])"
        )
        assert {name: json.loads(value) for name, value in row} == upstream_figures(served.metrics(), "docker.io")
        assert shown.page.text_content('[data-stat="hit_ratio.blob"]') == "50.0 %"
        counts = [int(c) for c in (shown.page.get_attribute("svg.chart", "data-counts") or "").split(",")]
        assert len(counts) == 60 and sum(counts) == 2 * (2 + len(LAYERS))  # manifest, config, layers per pull
        assert shown.page.locator("svg.chart rect").count() >= 1
        # The last hour: hit ratios, and the blob bytes per minute adding up to the counters of /metrics.
        assert shown.page.get_attribute('[data-hour="blob"]', "data-value") == "0.5"
        for source in ("cache", "upstream"):
            per_minute = shown.page.get_attribute("svg.chart.bytes", f"data-{source}") or ""
            assert sum(int(n) for n in per_minute.split(",")) == counter(
                served.metrics(), "mirror_blob_bytes_served_total", source=source
            )
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["overview-desktop.png", "overview-phone.png"]


@pytest.mark.parametrize("path", ["/", "/ui"], ids=["/ -> /ui/", "/ui -> /ui/"])
def test_the_root_leads_to_the_overview(browser: Browser, served: Mirror, tmp_path: Path, path: str) -> None:
    for shown in visit(browser, served.url + path, tmp_path, "root"):
        assert shown.page.url == served.url + "/ui/" and shown.page.title() == "Overview · mirror"


def test_unknown_pages_are_html_404s_that_escape_the_name(browser: Browser, served: Mirror, tmp_path: Path) -> None:
    name = "/ui/repositories/<b>demo</b>"
    for shown in visit(browser, served.url + name, tmp_path, "missing"):
        assert shown.status == 404
        # Chromium reports the 404 of the document itself; nothing else may fail.
        assert all("404" in e for e in shown.console_errors), shown.console_errors
        assert shown.page.text_content("#path") == name  # shown as text...
        assert shown.page.locator("main b").count() == 0  # ...not as markup
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(served.url + urllib.parse.quote(name), timeout=10)
    assert answer.value.code == 404 and answer.value.headers["Content-Type"].startswith("text/html")
    assert "&lt;b&gt;demo&lt;/b&gt;" in answer.value.read().decode()


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_ui_off_removes_the_pages(tmp_path: Path) -> None:
    with Mirror(tmp_path / "data", NO_UPSTREAM, "--ui", "off") as mirror:
        assert [status_of(mirror.url + p) for p in ("/ui/", "/", "/ui/anything")] == [404, 404, 404]
        assert status_of(mirror.url + "/v2/") == 200


def test_pages_need_credentials_without_anonymous_pull(browser: Browser, tmp_path: Path) -> None:
    htpasswd = make_htpasswd(tmp_path / "htpasswd", ("ana", "s3cret"))
    flags = ("--htpasswd", str(htpasswd), "--no-anonymous-pull")
    with Mirror(tmp_path / "data", NO_UPSTREAM, *flags) as mirror:
        assert [status_of(mirror.url + p) for p in ("/ui/", "/", "/ui/anything")] == [401, 401, 401]
        assert status_of(mirror.url + "/ui/", basic("ana", "wrong")) == 401
        credentials = {"username": "ana", "password": "s3cret"}
        for shown in visit(browser, mirror.url + "/ui/", tmp_path, "login", http_credentials=credentials):
            assert shown.status == 200 and not shown.console_errors, shown.console_errors
            assert shown.page.locator("h1").text_content() == "Overview"


def test_a_cold_pull_shows_a_progress_bar_that_advances_and_goes(browser: Browser, tmp_path: Path) -> None:
    registry, url = start_registry(tmp_path / "registry")
    nginx, slow_url = start_nginx(tmp_path / "nginx", url, throttle="1m")  # 1 MB/s: a 4 MB layer takes ~4 s
    try:
        push_random_image(url, "library/big", "1.0", [os.urandom(4_000_000)])
        with Mirror(tmp_path / "data", slow_url) as mirror:
            for shown in visit(browser, mirror.url + "/ui/", tmp_path, "inflight", sizes=("phone",)):
                page = shown.page
                assert page.is_visible("#inflight-empty")
                puller = threading.Thread(target=pull, args=(mirror.url, "big", "1.0"))
                puller.start()
                try:
                    bar = page.wait_for_selector("#inflight progress[max]", timeout=20_000)
                    assert bar is not None
                    first = float(bar.get_attribute("value") or 0)
                    assert page.text_content("#inflight td") == "docker.io/library/big"
                    page.wait_for_function(  # the bar advances without a reload...
                        "v => (document.querySelector('#inflight progress') || {value: Infinity}).value > v",
                        arg=first,
                        timeout=20_000,
                    )
                    assert page.text_content("#inflight td:last-child") == "1"  # the puller streaming it
                    page.screenshot(path=str(tmp_path / "inflight-phone-busy.png"), full_page=True)
                    assert not page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
                    page.wait_for_selector("#inflight tr", state="detached", timeout=30_000)  # ...and goes when done
                    assert page.is_visible("#inflight-empty")
                finally:
                    puller.join(60)
                assert not shown.console_errors, shown.console_errors
    finally:
        nginx.stop()
        registry.stop()
