"""The admin commands on real data, each in its own process beside a running ``mirror serve`` on the same data
dir (as operators run them): prefetch (with progress), ls, stats, pin, evict --dry-run, verify with a
deliberately corrupted file, gc of an unreferenced blob.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ops import Mirror, blob_files, run_cli, start_registry, wait_until
from tests.support.plain_http import pull, push_index, push_random_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    service, url = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        base = os.urandom(40_000)
        amd64 = push_random_image(url, "library/multi", None, [base, os.urandom(300_000)], arch="amd64")
        arm64 = push_random_image(url, "library/multi", None, [base, os.urandom(310_000)], arch="arm64")
        index = push_index(url, "library/multi", "1", {"linux/amd64": amd64, "linux/arm64": arm64})
        single = push_random_image(url, "library/single", "1", [os.urandom(120_000)])
        stray = push_random_image(url, "library/single", "stray", [os.urandom(70_000)])
        yield url, {"amd64": amd64, "arm64": arm64, "index": index, "single": single, "stray": stray}
    finally:
        service.stop()


def counter(mirror: Mirror, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", mirror.metrics(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_admin_commands_beside_a_running_server(upstream: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, images = upstream
    data = tmp_path / "data"
    config = tmp_path / "mirror.toml"
    config.write_text('cache_size = "1MiB"\n[cache]\ngc_grace = 0\nflush_interval = 0.2\n')
    common = ["--data-dir", str(data), "--config", str(config)]
    mirror = Mirror(data, url, "--config", str(config), log=tmp_path / "mirror.log")
    blob_gets = 'kind="blob",outcome="ok",upstream="docker.io"'
    try:
        # prefetch one platform of a multi-platform image, with progress, while the server runs
        out = run_cli("prefetch", *common, "--upstream", url, "multi:1", "--platform", "linux/amd64")
        assert "docker.io/library/multi:1: 3 blobs" in out.stdout
        assert "100%" in out.stderr  # progress lines (a bar on a terminal)
        before = counter(mirror, "mirror_upstream_requests_total", blob_gets)
        received = pull(mirror.url, "multi", "1")  # the server answers from what prefetch stored
        assert set(received["blobs"]) == {images["amd64"]["config"], *images["amd64"]["layers"]}
        assert counter(mirror, "mirror_upstream_requests_total", blob_gets) == before

        pull(mirror.url, "single", "1")
        # A blob fetched by digest alone (no manifest of it is cached): unreferenced, for gc below.
        stray_layer = images["stray"]["layers"][0]
        with urllib.request.urlopen(f"{mirror.url}/v2/single/blobs/{stray_layer}", timeout=30) as resp:
            assert len(resp.read()) == 70_000

        # ls: repositories, tags, platforms (cached or not), sizes
        repos = {r["repo"]: r for r in json.loads(run_cli("ls", "--json", *common).stdout)}
        (multi,) = repos["docker.io/library/multi"]["tags"]
        assert multi["tag"] == "1" and multi["digest"] == images["index"]
        assert multi["platforms"] == [
            {"platform": "linux/amd64", "cached": True},
            {"platform": "linux/arm64", "cached": False},
        ]
        assert multi["size_bytes"] == images["amd64"]["bytes"] + len_of(data, images["index"])
        assert "multi" in run_cli("ls", *common).stdout

        # stats: sizes agree with the disk; counters arrive within a flush interval
        files = blob_files(data)
        stats = json.loads(run_cli("stats", "--json", *common).stdout)
        assert stats["size_bytes"] == sum(files.values()) and stats["limit_bytes"] == 2**20
        assert stats["entries"]["manifest"] == 3  # index, amd64 manifest, single:1
        wait_until(
            lambda: json.loads(run_cli("stats", "--json", *common).stdout)["hit_ratio"]["blob"] is not None,
            what="counters flushed",
        )
        assert "hit ratio" in run_cli("stats", *common).stdout

        # pin + evict --dry-run: the pinned image is never a candidate; the oldest unpinned go first
        run_cli("pin", *common, "multi:1")
        plan = run_cli("evict", "--dry-run", *common, "--cache-size", "200KiB").stdout
        pinned = {images["index"], images["amd64"]["manifest"], images["amd64"]["config"], *images["amd64"]["layers"]}
        assert not any(digest in plan for digest in pinned)
        assert images["single"]["layers"][0] in plan
        assert blob_files(data) == files  # a dry run removes nothing

        # verify: a corrupted file is quarantined, and the next pull fetches it again
        victim = images["single"]["layers"][0]
        path = data / "blobs" / "sha256" / victim[7:9] / victim[7:]
        raw = bytearray(path.read_bytes())
        raw[1000] ^= 0x55
        path.write_bytes(bytes(raw))
        result = run_cli("verify", *common, check=False)
        assert result.returncode == 1 and f"quarantined {victim}" in result.stdout
        assert "verify: 100%" in result.stderr
        assert not path.exists() and len(list((data / "quarantine").iterdir())) == 1
        received = pull(mirror.url, "single", "1")  # digests checked by the puller
        assert received["blobs"][victim] == 120_000

        # gc: the unreferenced blob goes (dry run first), referenced content stays, the server reloads
        dry = run_cli("gc", "--dry-run", *common).stdout
        assert f"would remove {stray_layer}" in dry and "would remove 1 files (68.4 KiB)" in dry
        assert stray_layer in blob_files(data)
        done = run_cli("gc", *common).stdout
        assert "removed 1 files" in done
        assert stray_layer not in blob_files(data)
        wait_until(
            lambda: (
                counter(mirror, "mirror_cache_entries", 'kind="blob"')
                == sum(
                    1
                    for k in blob_files(data)
                    if k not in {images["index"], images["amd64"]["manifest"], images["single"]["manifest"]}
                )
            ),
            what="the server reloads after gc",
        )
        assert "0 did not match" in run_cli("verify", *common).stdout
    finally:
        mirror.stop()


def len_of(data: Path, digest: str) -> int:
    return (data / "blobs" / "sha256" / digest[7:9] / digest[7:]).stat().st_size
