"""Membership of two real replicas (``mirror serve`` on one bucket and one Redis): both listed by
``GET /admin/v1/cluster`` and ``mirror cluster status`` with their advertise addresses; one killed with SIGKILL
drops out by itself after its TTL, one stopped cleanly leaves at once; the fetches one holds are listed on the
other's web page."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.storage.members import TTL
from tests.integration.test_ui_workers import SIZE, fetches
from tests.support.cluster import replica_config
from tests.support.ops import Mirror, eventually, run_cli, start_nginx, start_registry, wait_until
from tests.support.plain_http import push_blob
from tests.support.redis import redis_server
from tests.support.seaweed import Seaweed, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration


def admin_cluster(mirror: Mirror) -> Any:
    with urllib.request.urlopen(f"{mirror.url}/admin/v1/cluster", timeout=10) as resp:
        return json.load(resp)


def api_members(mirror: Mirror) -> dict[str, Any]:
    body = admin_cluster(mirror)
    assert body["cluster"] is True
    return {m["advertise"]: m for m in body["members"]}


def cli_members(config: Path, data_dir: Path) -> dict[str, Any]:
    result = run_cli("cluster", "status", "--json", "--config", str(config), "--data-dir", str(data_dir))
    return {m["advertise"]: m for m in json.loads(result.stdout)["members"]}


def test_replicas_are_listed_and_a_killed_one_drops_out_after_its_ttl(seaweed: Seaweed, tmp_path: Path) -> None:
    upstream, url = start_registry(tmp_path / "registry")
    try:
        with redis_server(tmp_path / "redis") as redis:
            configs = {
                n: replica_config(tmp_path / f"{n}.toml", seaweed, redis.url, "members/", f"http://{n}.mirror:5000")
                for n in "ab"
            }
            flags = ("--read-only", "--admin-api")
            a = Mirror(tmp_path / "a", url, "--config", str(configs["a"]), *flags)
            b = Mirror(tmp_path / "b", url, "--config", str(configs["b"]), *flags)
            try:
                both = {"http://a.mirror:5000", "http://b.mirror:5000"}
                wait_until(lambda: set(api_members(a)) == both, what="both replicas registered")
                listed = cli_members(configs["a"], tmp_path / "cli")
                assert set(listed) == both and set(api_members(b)) == both
                assert all(time.time() - m["last_seen"] < TTL and m["fetches"] == 0 for m in listed.values())
                text = run_cli("cluster", "status", "--config", str(configs["a"]), "--data-dir", str(tmp_path / "cli"))
                assert "http://b.mirror:5000" in text.stdout and "2 replicas alive" in text.stdout

                b.kill9()
                killed = time.monotonic()
                assert set(api_members(a)) == both, "a replica that died stays listed until its entry expires"
                wait_until(lambda: set(api_members(a)) == {"http://a.mirror:5000"}, what="the killed one dropped")
                assert time.monotonic() - killed <= TTL + 2.0

                a.stop()  # a clean stop leaves at once: nobody is left to list
                assert cli_members(configs["a"], tmp_path / "cli") == {}
            finally:
                a.stop()
                b.stop()
    finally:
        upstream.stop()


def test_one_node_has_no_members(tmp_path: Path) -> None:
    upstream, url = start_registry(tmp_path / "registry")
    try:
        with Mirror(tmp_path / "data", url, "--admin-api") as mirror:
            assert admin_cluster(mirror) == {"cluster": False, "members": []}
        result = run_cli("cluster", "status", "--data-dir", str(tmp_path / "data"), check=False)
        assert result.returncode == 2 and "no [cluster] table" in result.stderr
    finally:
        upstream.stop()


async def test_the_web_page_of_one_replica_lists_the_fetch_another_replica_holds(
    seaweed: Seaweed, tmp_path: Path
) -> None:
    """What a replica's heartbeat lists of the fetches it holds reaches the other replicas' list of fetches in flight
    (``/ui/inflight.json``, what the overview shows): repository, size, bytes so far, and no client count."""
    registry, url = start_registry(tmp_path / "registry")
    nginx, slow = start_nginx(tmp_path / "nginx", url, throttle="1m")  # ~4 s for the blob
    digest = push_blob(url, "library/listed", os.urandom(SIZE))
    try:
        with redis_server(tmp_path / "redis") as redis:
            configs = {
                n: replica_config(tmp_path / f"{n}.toml", seaweed, redis.url, "members/", f"http://{n}.mirror:5000")
                for n in "ab"
            }
            with (
                Mirror(tmp_path / "a", slow, "--config", str(configs["a"])) as a,
                Mirror(tmp_path / "b", slow, "--config", str(configs["b"])) as b,
            ):
                received = [0]

                async def download() -> None:
                    blob = f"{a.url}/v2/library/listed/blobs/{digest}"
                    async with aiohttp.ClientSession() as session, session.get(blob) as resp:
                        async for chunk in resp.content.iter_any():
                            received[0] += len(chunk)

                task = asyncio.ensure_future(download())
                await eventually(lambda: received[0] > 0, what="the download under way")
                await eventually(lambda: bool(fetches(b.url)), what="the other replica listing the fetch")
                (row,) = fetches(b.url)
                assert (row["digest"], row["repo"], row["upstream"]) == (
                    digest,
                    "docker.io/library/listed",
                    "docker.io",
                )
                assert row["size"] == SIZE and 0 < row["written"] <= SIZE and row["clients"] is None
                (own,) = fetches(a.url)  # the replica that runs it counts its client
                assert own["digest"] == digest and own["clients"] == 1
                await task
                assert received[0] == SIZE
                await eventually(lambda: fetches(b.url) == [], what="the finished fetch leaving the list")
    finally:
        nginx.stop()
        registry.stop()
