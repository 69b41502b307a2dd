"""The benchmark harness (tests/bench, run by hand) kept working: its pure parts, and one small pass over the four
real servers (streamed push, the raw-socket getter, the HEAD client, upstream GET counting, nginx on the cached
file)."""

from __future__ import annotations

from pathlib import Path

from tests.bench import workloads
from tests.bench.data import push_random_blob
from tests.bench.load import get, head_rate, parallel_get, rss_kib, wrk
from tests.bench.report import table
from tests.bench.servers import start_all
from tests.support.ops import require

BENCH = Path(__file__).resolve().parent / "bench"


def test_bench_modules_are_not_collected() -> None:
    assert not list(BENCH.glob("test_*.py")) and not list(BENCH.glob("*_test.py"))


def test_rounds_alternate_who_goes_first() -> None:
    assert workloads.orders(3) == [("mirror", "proxy"), ("proxy", "mirror"), ("mirror", "proxy")]
    assert workloads.orders(3, ("a", "b", "c"))[1] == ("b", "c", "a")


def test_table_shows_ratios_and_targets() -> None:
    rows = [workloads.row("x", "GB/s", {"mirror": [2.0, 1.0, 3.0], "proxy": [1.0], "nginx": [4.0]}, "higher",
                          ">= 0.9x nginx", False, "nginx")]  # fmt: skip
    doc = {
        "workloads": {"cached": rows},
        "plan": {"rounds": 3},
        "command": "python -m tests.bench",
        "machine": {"cores": 2, "cpu": "cpu", "memory_gib": 1, "load_average_at_end": [0.1, 0.1, 0.1]},
        "versions": {k: k for k in ("mirror", "python", "aiohttp", "distribution", "nginx", "wrk", "skopeo")},
    }
    text = table(doc)
    assert "| x | GB/s | 2.00 | 1.00 | 4.00 (nginx) | 2.00x | 0.50x | >= 0.9x nginx | **no** |" in text


def test_four_servers_and_the_load_clients(tmp_path: Path) -> None:
    for binary in ("docker-registry", "nginx", "wrk"):
        require(binary)
    servers = start_all(tmp_path, [])
    try:
        digest = push_random_blob(servers.upstream_url, "bench/smoke", 3 << 20)
        mirror_url = f"{servers.mirror.url}/v2/bench/smoke/blobs/{digest}"
        assert parallel_get(mirror_url, 4, expect=3 << 20).statuses == [200] * 4
        assert workloads.upstream_gets(servers, digest) == 1
        assert get(f"{servers.proxy_url}/v2/bench/smoke/blobs/{digest}").size == 3 << 20
        assert get(servers.nginx_blob_url(digest)).size == 3 << 20  # nginx serves the mirror's own file
        assert head_rate(mirror_url, 0.3, connections=4).requests > 0
        assert wrk(mirror_url, 1, connections=2).errors == 0
        assert rss_kib(servers.pid("mirror")) > 0
        assert servers.cpu_seconds("nginx") >= 0
    finally:
        servers.stop()
