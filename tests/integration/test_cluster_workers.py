"""A cluster replica on every core of its host: ``mirror serve --workers 2`` with ``[cluster]``, beside a replica
of one process, both real subprocesses over one real SeaweedFS bucket and one real Redis, in front of a real
Distribution slowed by nginx. Each worker is a replica of its own: it advertises its own port (the advertised
port + 1 + its slot), keeps its own directory under ``<data-dir>/workers``, and takes part in the cluster's one
upstream fetch per digest like any other replica. A worker killed with SIGKILL is replaced by one that takes its
slot, port and directory again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.cluster import bucket_keys, metric, replica_config
from tests.support.ops import (
    Mirror,
    eventually,
    free_port,
    nginx_requests,
    throttled_upstream,
    upstream_requests,
    wait_until,
)
from tests.support.plain_http import exchange, push_blob
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture
from tests.support.seaweed import Seaweed, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration
BIG = 8 << 20  # about 4 s through the slow nginx (2 MB/s)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with throttled_upstream(tmp_path_factory.mktemp("cluster-workers"), slow="2m") as upstream:
        yield upstream


def free_run(count: int) -> int:
    """A port with the ``count - 1`` after it free too (the shared port, then one per worker)."""
    while True:
        first = free_port()
        if first + count < 65536 and all(_free(first + n) for n in range(1, count)):
            return first


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def members(mirror: Mirror) -> list[str]:
    with urllib.request.urlopen(f"{mirror.url}/admin/v1/cluster", timeout=10) as resp:
        return sorted(m["advertise"] for m in json.load(resp)["members"])


def booted(mirror: Mirror) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", mirror.log.read_text())]


def replicas(
    stack: ExitStack, tmp_path: Path, upstream: str, seaweed: Seaweed, redis: RedisServer, prefix: str
) -> tuple[Mirror, Mirror, list[str]]:
    """Replica A with two workers, replica B of one process; and the URLs of A's two workers."""
    port = free_run(5)  # the shared port, then two slots per worker
    a_url = f"http://127.0.0.1:{port}"
    a_config = replica_config(tmp_path / "a.toml", seaweed, redis.url, prefix, a_url)
    a = stack.enter_context(
        Mirror(
            tmp_path / "a",
            upstream,
            "--config",
            str(a_config),
            "--workers",
            "2",
            "--admin-api",
            listen=f"127.0.0.1:{port}",
        )
    )
    b_listen = f"127.0.0.1:{free_port()}"
    b_config = replica_config(tmp_path / "b.toml", seaweed, redis.url, prefix, f"http://{b_listen}")
    b = stack.enter_context(Mirror(tmp_path / "b", upstream, "--config", str(b_config), "--admin-api", listen=b_listen))
    workers = [f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"]
    wait_until(lambda: members(b) == sorted([*workers, b.url]), what="both workers of A and B listed as members")
    return a, b, workers


async def test_each_worker_is_a_replica_and_a_herd_over_all_three_makes_one_upstream_get(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/herd", data)
    with ExitStack() as stack:
        a, b, workers = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, "workers-herd/")
        assert members(a) == members(b), "every replica lists the same members"
        targets = [*workers, b.url]  # each worker through its own port: all three take clients
        async with aiohttp.ClientSession() as session:

            async def get(url: str) -> str:
                async with session.get(f"{url}/v2/library/herd/blobs/{digest}") as resp:
                    assert resp.status == 200
                    return hashlib.sha256(await resp.read()).hexdigest()

            bodies = await asyncio.gather(*(get(targets[n % 3]) for n in range(24)))
        assert bodies == [digest.partition(":")[2]] * 24, "every body's digest is right"
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1, "one upstream GET for the cluster"
        # One of the three held the lease and served the other two, each of which followed it once. A's figures
        # are its two workers' summed.
        served = metric(a, "mirror_cluster_peer_streams_served_total") + metric(
            b, "mirror_cluster_peer_streams_served_total"
        )
        followed = metric(a, "mirror_cluster_peer_streams_followed_total") + metric(
            b, "mirror_cluster_peer_streams_followed_total"
        )
        assert (served, followed) == (2, 2)
        assert sorted(p.name for p in (tmp_path / "a" / "workers").iterdir()) == ["0", "1"], "a directory per slot"
        async with aiohttp.ClientSession() as session:  # a hit through the shared port, whichever worker takes it
            for _ in range(4):
                async with session.get(f"{a.url}/v2/library/herd/blobs/{digest}") as resp:
                    assert hashlib.sha256(await resp.read()).hexdigest() == digest.partition(":")[2]
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1


async def test_a_killed_worker_is_replaced_on_its_own_slot_and_port(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    digest = push_blob(upstream["url"], "library/slot", os.urandom(4096))
    with ExitStack() as stack:
        a, b, workers = replicas(stack, tmp_path, upstream["url"], seaweed, redis_server, "workers-slot/")
        wait_until(lambda: len(booted(a)) == 2, what="two workers booted")
        victim = booted(a)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(booted(a)) == 3, what="a worker booted in the dead one's place")
        # The replacement takes the freed slot: its port answers again, and it is listed under it.
        for url in workers:
            wait_until(lambda: _answers(f"{url}/v2/library/slot/blobs/{digest}"), what=f"{url} serving")  # noqa: B023
        assert set(workers) <= set(members(b))
        assert a.alive()


def worker_pid(mirror: Mirror, slot: int) -> int:
    """The pid of the worker that took ``slot`` last, from its log line."""
    found = re.findall(rf"\[(\d+)\] mirror\.workers: worker {slot} of this replica", mirror.log.read_text())
    assert found, f"no worker took slot {slot}"
    return int(found[-1])


async def test_kill_9_of_the_worker_holding_the_lease_is_taken_over_by_another_worker_or_replica(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Worker 0 of A holds the fetch and dies mid-blob while 8 clients read through worker 1 and replica B: one of
    them takes the fetch over with an upstream Range request, every one of the 8 ends with the right bytes, and a
    new worker takes slot 0 again."""
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/takeover", data)
    received = [0] * 9
    with ExitStack() as stack:
        a, b, workers = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, "workers-takeover/")
        async with aiohttp.ClientSession() as session:

            async def get(url: str, n: int) -> str:
                hasher = hashlib.sha256()
                async with session.get(f"{url}/v2/library/takeover/blobs/{digest}") as resp:
                    assert resp.status == 200
                    async for chunk in resp.content.iter_any():
                        hasher.update(chunk)
                        received[n] += len(chunk)
                return hasher.hexdigest()

            first = asyncio.ensure_future(get(workers[0], 0))  # the first miss: worker 0 takes the lease
            await eventually(lambda: received[0] > 0, what="worker 0 streaming")
            rest = [asyncio.ensure_future(get((workers[1], b.url)[n % 2], n)) for n in range(1, 9)]
            await eventually(lambda: all(received[1:]), what="the others' clients streaming")
            os.kill(worker_pid(a, 0), signal.SIGKILL)
            outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        assert isinstance(outcomes[0], aiohttp.ClientError), "the dead worker's own client is cut"
        assert outcomes[1:] == [digest.partition(":")[2]] * 8, "every client of the others completes"
        takeovers = metric(a, "mirror_cluster_takeovers_total") + metric(b, "mirror_cluster_takeovers_total")
        assert takeovers == 1
        requests = nginx_requests(upstream["slow_dir"], f"/blobs/{digest}", at_least=2)
        assert len(requests) == 2 and len([r for _, _, r in requests if r != "-"]) == 1, requests
        key = f"workers-takeover/blobs/{digest.replace(':', '/')}"
        assert bucket_keys(seaweed, "workers-takeover/") == {key: BIG}, "one object, complete, and no other"
        wait_until(lambda: len(booted(a)) == 3, what="a worker booted in the dead one's place")
        wait_until(lambda: workers[0] in members(b), what="slot 0 listed again")
        assert _answers(f"{workers[0]}/v2/library/takeover/blobs/{digest}")
        tmp = tmp_path / "a" / "workers" / "0" / "tmp"
        wait_until(lambda: list(tmp.iterdir()) == [], what="the dead worker's temp file cleaned by the new one")


async def test_a_reload_serves_at_once_from_new_slots_while_the_old_workers_drain(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGHUP starts a new generation of workers; they take the two free slots (ports + 3 and + 4) at once and
    serve while the old workers finish the download they have in flight, then leave the cluster."""
    small = push_blob(upstream["url"], "library/during", os.urandom(4096))
    data = os.urandom(BIG)
    big = push_blob(upstream["url"], "library/during", data)
    with ExitStack() as stack:
        a, b, workers = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, "workers-reload/")
        base = int(workers[0].rpartition(":")[2]) - 1
        new = [f"http://127.0.0.1:{base + 3}", f"http://127.0.0.1:{base + 4}"]
        assert _answers(f"{a.url}/v2/library/during/blobs/{small}")
        async with aiohttp.ClientSession() as session, session.get(f"{a.url}/v2/library/during/blobs/{big}") as resp:
            assert resp.status == 200
            head = await resp.content.readexactly(1 << 16)  # the download is under way, for seconds
            a.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: len(booted(a)) == 4, what="a new generation of workers")
            wait_until(lambda: set(new) <= set(members(b)), what="the new workers listed at their own ports")
            for _ in range(4):  # on fresh connections: the new workers answer while the old one still sends
                assert _answers(f"{a.url}/v2/library/during/blobs/{small}")
            assert not resp.content.at_eof(), "the download in flight is not over yet"
            assert hashlib.sha256(head + await resp.read()).digest() == hashlib.sha256(data).digest()
        wait_until(lambda: members(b) == sorted([*new, b.url]), what="the old generation gone from the cluster")


def test_a_chunked_push_spread_over_the_workers_and_the_other_replica_completes(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The session lives on the worker that opened it (in its own directory); a PATCH, GET or PUT reaching the
    other worker or the other replica is forwarded to it, at its own port."""
    with ExitStack() as stack:
        a, b, workers = replicas(stack, tmp_path, upstream["url"], seaweed, redis_server, "workers-push/")
        layer = os.urandom(3 * 2**20 + 5)
        status, headers, body = exchange(workers[0], "POST", "/v2/team/spread/blobs/uploads/")
        assert status == 202, body
        location, third = headers["Location"], len(layer) // 3
        for n, target in enumerate((workers[1], b.url, workers[1])):  # never the worker holding the session
            part = layer[n * third :] if n == 2 else layer[n * third : (n + 1) * third]
            span = {"Content-Range": f"{n * third}-{n * third + len(part) - 1}"}
            status, headers, body = exchange(target, "PATCH", location, part, span)
            assert (status, headers["Range"]) == (202, f"0-{n * third + len(part) - 1}"), body
        digest = "sha256:" + hashlib.sha256(layer).hexdigest()
        status, headers, body = exchange(b.url, "PUT", f"{location}?digest={digest}")
        assert (status, headers["Docker-Content-Digest"]) == (201, digest), body
        for url in (a.url, *workers, b.url):
            status, _, body = exchange(url, "GET", f"/v2/team/spread/blobs/{digest}")
            assert status == 200 and hashlib.sha256(body).hexdigest() == digest.partition(":")[2]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
