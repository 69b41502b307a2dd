"""One upstream fetch per digest for the whole cluster: three real ``mirror serve`` replicas, each with its own data
dir, sharing one real SeaweedFS bucket (one prefix) and one real Redis, in front of a real Distribution slowed by
nginx so a fetch takes seconds. The replica that takes a blob's lease fetches it; the others stream it live from
that replica's internal endpoint, which answers only callers with the cluster secret."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_py
import redis.asyncio as aioredis
from aiohttp import web

from mirror.upstream.peers import SECRET_HEADER
from tests.support.cluster import SECRET, bucket_keys, metric, replica_config
from tests.support.credentials import basic, make_htpasswd
from tests.support.ops import (
    Mirror,
    eventually,
    free_port,
    nginx_requests,
    record_figures,
    throttled_upstream,
    upstream_requests,
)
from tests.support.plain_http import push_blob
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration

BIG = 8 << 20  # about 4 s through the slow nginx (2 MB/s)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with throttled_upstream(tmp_path_factory.mktemp("cluster"), slow="2m") as upstream:
        yield upstream


def replicas(
    stack: ExitStack,
    work: Path,
    upstream: str,
    seaweed: Seaweed,
    redis: RedisServer,
    prefix: str,
    count: int = 3,
    flags: tuple[str, ...] = (),
) -> list[Mirror]:
    """``count`` replicas, each with its own data dir, advertising its own URL."""
    started = []
    for n in range(count):
        listen = f"127.0.0.1:{free_port()}"
        config = replica_config(work / f"replica-{n}.toml", seaweed, redis.url, prefix, f"http://{listen}")
        mirror = Mirror(work / f"data-{n}", upstream, "--config", str(config), "--read-only", *flags, listen=listen)
        started.append(stack.enter_context(mirror))
    return started


def open_uploads(seaweed: Seaweed, prefix: str) -> list[str]:
    listed = raw_client(seaweed.endpoint_url).list_multipart_uploads(Bucket=seaweed.bucket, Prefix=prefix)
    return [upload["Key"] for upload in listed.get("Uploads", [])]


async def test_32_cold_gets_over_three_replicas_make_one_upstream_get(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/herd", data)
    with ExitStack() as stack:
        mirrors = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, "herd/")
        async with aiohttp.ClientSession() as session:

            async def get(mirror: Mirror) -> str:
                async with session.get(f"{mirror.url}/v2/library/herd/blobs/{digest}") as resp:
                    assert resp.status == 200
                    return hashlib.sha256(await resp.read()).hexdigest()

            began = time.monotonic()
            bodies = await asyncio.gather(*(get(mirrors[n % 3]) for n in range(32)))
            record_figures("cluster herd", clients=32, replicas=3, seconds=round(time.monotonic() - began, 3))
        assert bodies == [digest.partition(":")[2]] * 32, "every body's digest is right"
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1, "one upstream GET for the cluster"

        served = [metric(m, "mirror_cluster_peer_streams_served_total") for m in mirrors]
        followed = [metric(m, "mirror_cluster_peer_streams_followed_total") for m in mirrors]
        holders = [n for n in range(3) if served[n]]
        assert len(holders) == 1, f"one replica held the lease and served the others: {served}"
        others = [n for n in range(3) if n != holders[0]]
        assert [followed[n] for n in others] == [1, 1], "each of the others followed the holder once"
        assert served[holders[0]] == 2 and followed[holders[0]] == 0
        assert [metric(m, "mirror_cluster_leases_held") for m in mirrors] == [0, 0, 0], "released when done"

        assert bucket_keys(seaweed, "herd/") == {f"herd/blobs/{digest.replace(':', '/')}": BIG}, "one object"
        assert open_uploads(seaweed, "herd/") == [], "the followers uploaded nothing"
        for n in range(3):
            tmp = tmp_path / f"data-{n}" / "tmp"
            await eventually(lambda: list(tmp.iterdir()) == [], what="no temp file left on any replica")  # noqa: B023

        async with aiohttp.ClientSession() as session:  # now a hit on every replica, still one upstream GET
            for mirror in mirrors:
                async with session.get(f"{mirror.url}/v2/library/herd/blobs/{digest}") as resp:
                    assert hashlib.sha256(await resp.read()).hexdigest() == digest.partition(":")[2]
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1


async def test_a_head_through_another_replica_is_answered_from_the_holders_announced_size(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/headed", data)
    with ExitStack() as stack:
        holder, other = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, "headed/", count=2)
        url = f"/v2/library/headed/blobs/{digest}"
        async with aiohttp.ClientSession() as session, session.get(holder.url + url) as resp:
            assert resp.status == 200
            await resp.content.readexactly(1 << 16)  # the fetch is under way on the holder, for seconds
            async with session.head(other.url + url) as head:
                assert (head.status, head.headers["Content-Length"]) == (200, str(BIG))
                assert head.headers["Docker-Content-Digest"] == digest
            assert hashlib.sha256(data[: 1 << 16] + await resp.read()).hexdigest() == digest.partition(":")[2]
        assert upstream_requests(upstream["log"], "HEAD", f"/blobs/{digest}") == 0, "no upstream HEAD"
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1


def served_at(redis: RedisServer, digest: str) -> float | None:
    """The last-served time the cluster's usage table holds for ``digest`` (None: no entry)."""
    with redis_py.Redis.from_url(redis.url) as client:
        row = client.hget("mirror:usage:entries", digest)
    return float(row.split()[1]) if isinstance(row, bytes) else None


async def test_a_blob_another_replica_stored_a_moment_ago_is_a_hit_and_its_latest_serve(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The second replica has not read the first one's record yet (its flush is 10 s away), so it takes the miss
    path, which finds the object in the bucket: a hit, and the eviction order learns it was served."""
    data = os.urandom(4096)
    digest = push_blob(upstream["url"], "library/fresh", data)
    url = f"/v2/library/fresh/blobs/{digest}"
    with ExitStack() as stack:
        first, second = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, "fresh/", count=2)
        async with aiohttp.ClientSession() as session:
            async with session.get(first.url + url) as resp:
                assert resp.status == 200 and await resp.read() == data
            # The client has every byte before the object is stored and recorded.
            await eventually(lambda: served_at(redis_server, digest) is not None, what="the first replica's record")
            stored = served_at(redis_server, digest)
            assert stored is not None
            async with session.get(second.url + url) as resp:
                assert resp.status == 200 and await resp.read() == data
        lookups = [
            line
            for line in second.metrics().splitlines()
            if line.startswith("mirror_cache_requests_total{") and 'kind="blob"' in line
        ]
        assert [line.rpartition(" ")[2] for line in lookups if 'result="hit"' in line] == ["1.0"], lookups
        assert not [line for line in lookups if 'result="miss"' in line and not line.endswith(" 0.0")], lookups
        second.stop()  # a clean stop writes its last-served times
        assert (served_at(redis_server, digest) or 0) > stored, "the second replica's serve is the latest"
    assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1


def peer_get(mirror: Mirror, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(mirror.url.removeprefix("http://"), timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "headers",
    [{}, {SECRET_HEADER: "wrong-" + SECRET[6:]}, {SECRET_HEADER: ""}, {"Authorization": f"Bearer {SECRET}"}],
    ids=["no secret -> 401", "wrong secret -> 401", "empty secret -> 401", "secret elsewhere -> 401"],
)
def test_the_peer_endpoint_answers_401_and_nothing_else_without_the_secret(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path, headers: dict[str, str]
) -> None:
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/secret", data)
    with ExitStack() as stack:
        (mirror,) = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, "secret/", count=1)
        # A fetch under way on it, so there is something a caller without the secret could try to read.
        conn = http.client.HTTPConnection(mirror.url.removeprefix("http://"), timeout=30)
        conn.request("GET", f"/v2/library/secret/blobs/{digest}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(1)
        held = [key for key in redis_keys(redis_server) if digest in key]
        assert held, "the replica holds the lease of the fetch"
        fetch_id = lease_value(redis_server, held[0]).partition(" ")[0]
        path = f"/_mirror/v1/fetches/docker.io/{digest}?fetch={fetch_id}"
        status, body = peer_get(mirror, path, headers)
        assert status == 401
        assert json.loads(body) == {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        assert digest.partition(":")[2].encode() not in body and SECRET[:12].encode() not in body
        status, body = peer_get(mirror, path, {SECRET_HEADER: SECRET, "Range": "bytes=5-"})
        assert (status, body) == (206, data[5:]), "with the secret: the bytes (from where a follower asks)"
        status, _ = peer_get(mirror, path.replace(fetch_id, "another"), {SECRET_HEADER: SECRET})
        assert status == 404, "a fetch it does not hold under that id"
        conn.close()


def test_htpasswd_does_not_guard_the_peer_endpoint_the_secret_does(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    """With ``--htpasswd`` (no anonymous pulls), replicas still reach each other with the secret alone, and a user's
    valid credentials do not open the endpoint without it."""
    users = make_htpasswd(tmp_path / "htpasswd", ("alice", "wonderland"))
    with ExitStack() as stack:
        (mirror,) = replicas(
            stack, tmp_path, upstream["slow"], seaweed, redis_server, "htpasswd/", 1, ("--htpasswd", str(users))
        )
        path = f"/_mirror/v1/fetches/docker.io/sha256:{'0' * 64}?fetch=none"
        assert peer_get(mirror, "/v2/", {})[0] == 401, "the registry asks for credentials"
        assert peer_get(mirror, path, {SECRET_HEADER: SECRET})[0] == 404, "the secret alone passes: no such fetch"
        assert peer_get(mirror, path, basic("alice", "wonderland"))[0] == 401, "a user is not a replica"


def redis_keys(redis: RedisServer) -> list[str]:
    with redis_py.Redis.from_url(redis.url) as client:
        return [key.decode() for key in client.keys("mirror:lease:*")]


def lease_value(redis: RedisServer, key: str) -> str:
    with redis_py.Redis.from_url(redis.url) as client:
        value = client.get(key)
        assert isinstance(value, bytes)
        return value.decode()


async def fake_holder(
    body: bytes,
    size: int,
    lease: str,
    redis_url: str,
    dies: Callable[[], None] | None = None,
    after: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> tuple[web.AppRunner, str]:
    """A replica that holds ``lease`` and streams ``body`` as a blob of ``size`` bytes: the faults a real holder
    never shows (it verifies what it serves), to check that a follower verifies for itself. A short ``body`` is cut:
    like a holder whose fetch failed, it releases the lease then; or with ``dies`` (which completes the object in
    the bucket) like a holder that completed the object and died before its last bytes, holding the lease. After a
    whole body, ``after`` runs in the background: what a real holder does once it sent its last byte (it completes
    the object, or fails to, and lets the lease go)."""
    running: set[asyncio.Task[None]] = set()

    async def serve(request: web.Request) -> web.StreamResponse:
        assert request.headers.get(SECRET_HEADER) == SECRET
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        rest = body
        await resp.write(rest)
        if len(body) < size:
            if dies is not None:
                await asyncio.to_thread(dies)
            assert request.transport is not None
            request.transport.abort()
            if dies is None:
                async with aioredis.Redis.from_url(redis_url) as client:
                    await client.delete(lease)
            return resp
        await resp.write_eof()
        if after is not None:
            running.add(task := asyncio.create_task(after()))
            task.add_done_callback(running.discard)
        return resp

    app = web.Application()
    app.router.add_get("/_mirror/v1/fetches/{registry}/{digest}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("served", "expected", "upstream_gets"),
    [
        ("right", "whole", 0),
        ("right, its upload failed", "whole", 0),
        ("wrong", "cut", 0),
        ("failed", "whole", 1),
        ("died after completing", "whole", 0),
    ],
    ids=[
        "holder streams the right bytes -> 200 before the holder's object is complete, verified by the follower",
        "holder streams every byte, then lets the lease go without the object -> the follower uploads its bytes",
        "holder streams wrong bytes of the right size -> the follower's client is cut",
        "holder's fetch fails mid-blob -> the follower takes it over with a Range request",
        "holder completes the object and dies before its last bytes -> the rest from the bucket",
    ],
)
async def test_a_follower_serves_only_bytes_it_verified_itself(
    upstream: dict[str, Any],
    seaweed: Seaweed,
    redis_server: RedisServer,
    tmp_path: Path,
    served: str,
    expected: str,
    upstream_gets: int,
) -> None:
    data = os.urandom(1 << 20)
    digest = push_blob(upstream["url"], "library/verified", data)
    prefix = f"verified-{served.replace(' ', '-')}/"
    key = f"{prefix}blobs/{digest.replace(':', '/')}"
    whole = served.startswith("right")
    body = data if whole else os.urandom(len(data)) if served == "wrong" else data[: len(data) // 2]
    lease = f"mirror:lease:docker.io:{digest}"

    def complete() -> None:
        raw_client(seaweed.endpoint_url).put_object(Bucket=seaweed.bucket, Key=key, Body=data)

    async def let_go() -> None:  # a real holder completes the object after its last byte, then releases the lease
        if served == "right":
            await asyncio.sleep(1.0)  # long after the follower's client had every byte
            await asyncio.to_thread(complete)
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.delete(lease)

    dies = complete if served == "died after completing" else None
    runner, holder_url = await fake_holder(body, len(data), lease, redis_server.url, dies, let_go if whole else None)
    try:
        async with aioredis.Redis.from_url(redis_server.url) as client:  # the fake holds the lease (for a minute)
            await client.set(lease, f"fake {holder_url}", px=60_000)
        with ExitStack() as stack:
            (mirror,) = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, prefix, 1)
            async with aiohttp.ClientSession() as session:
                got = b""
                try:
                    async with session.get(f"{mirror.url}/v2/library/verified/blobs/{digest}") as resp:
                        assert resp.status == 200
                        async for chunk in resp.content.iter_any():
                            got += chunk
                    outcome = "whole"
                except aiohttp.ClientPayloadError:
                    outcome = "cut"
            assert outcome == expected
            if served == "right":
                assert bucket_keys(seaweed, prefix) == {}, "the client had its last byte before the object was complete"
            if outcome == "whole":
                assert got == data
            else:
                assert len(got) < len(data), "never the whole body"
            assert metric(mirror, "mirror_cluster_peer_streams_followed_total") == 1
            assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == upstream_gets
            if upstream_gets:
                ranged = [rng for _, _, rng in nginx_requests(upstream["slow_dir"], f"/blobs/{digest}", at_least=1)]
                # The rest of the blob only: from what the follower kept of the holder's bytes (the holder's cut
                # can reach it with bytes still unread, which its HTTP client then drops: from 0, a plain GET).
                assert ranged in ([f"bytes={len(body)}-"], ["-"]), ranged
                assert metric(mirror, "mirror_cluster_takeovers_total") == 1
            if served == "right, its upload failed":  # the follower took the lease, uploaded what it verified
                await eventually(lambda: metric(mirror, "mirror_cluster_takeovers_total") == 1, what="a takeover")
            want = {} if served == "wrong" else {key: len(data)}
            # The object is completed just after the client had its last byte (verified): wait for it.
            await eventually(lambda: bucket_keys(seaweed, prefix) == want, what=f"the bucket holding {want}")
            tmp = tmp_path / "data-0" / "tmp"
            await eventually(lambda: list(tmp.iterdir()) == [], what="its temp file gone")  # removed once stored
    finally:
        await runner.cleanup()


async def test_kill_9_of_the_lease_holder_is_taken_over_with_a_range_request(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The holder dies mid-blob while 8 clients read through the two other replicas: its lease expires, one of them
    takes the fetch over from the bytes it has (an upstream Range request for the rest, the object uploaded by it),
    the other follows the new holder from where it is, and every one of the 8 ends with the right bytes."""
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/takeover", data)
    received = [0] * 9
    with ExitStack() as stack:
        holder, *others = replicas(stack, tmp_path, upstream["slow"], seaweed, redis_server, "takeover/")
        async with aiohttp.ClientSession() as session:

            async def get(mirror: Mirror, n: int) -> str:
                hasher = hashlib.sha256()
                async with session.get(f"{mirror.url}/v2/library/takeover/blobs/{digest}") as resp:
                    assert resp.status == 200
                    async for chunk in resp.content.iter_any():
                        hasher.update(chunk)
                        received[n] += len(chunk)
                return hasher.hexdigest()

            first = asyncio.ensure_future(get(holder, 0))  # the first miss: this replica takes the lease
            await eventually(lambda: received[0] > 0, what="the holder streaming")
            rest = [asyncio.ensure_future(get(others[n % 2], n)) for n in range(1, 9)]
            await eventually(lambda: all(received[1:]), what="the other replicas' clients streaming")
            holder.kill9()
            at_kill = min(received[1:])
            began = time.monotonic()
            outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
            after_kill = round(time.monotonic() - began, 3)
        assert isinstance(outcomes[0], aiohttp.ClientError), "the dead replica's own client is cut"
        assert outcomes[1:] == [digest.partition(":")[2]] * 8, "every client of the other replicas completes"
        assert received[1:] == [BIG] * 8
        takeovers = [metric(m, "mirror_cluster_takeovers_total") for m in others]
        assert sorted(takeovers) == [0, 1], f"one replica took the fetch over: {takeovers}"
        # The upstream saw the first GET and one Range request for the rest, from bytes the new holder had.
        requests = nginx_requests(upstream["slow_dir"], f"/blobs/{digest}", at_least=2)
        ranged = [(status, rng) for _, status, rng in requests if rng != "-"]
        assert len(requests) == 2 and len(ranged) == 1, requests
        status, rng = ranged[0]
        start = int(rng.removeprefix("bytes=").removesuffix("-"))
        assert status == 206 and rng == f"bytes={start}-" and at_kill <= start < BIG, ranged
        record_figures("cluster takeover", blob=BIG, range_start=start, seconds_after_kill=after_kill)
        key = f"takeover/blobs/{digest.replace(':', '/')}"
        assert bucket_keys(seaweed, "takeover/") == {key: BIG}, "one object, complete, and no other"
        stored = raw_client(seaweed.endpoint_url).get_object(Bucket=seaweed.bucket, Key=key)["Body"].read()
        assert hashlib.sha256(stored).hexdigest() == digest.partition(":")[2], "verified"
        for n in (1, 2):
            tmp = tmp_path / f"data-{n}" / "tmp"
            await eventually(lambda: list(tmp.iterdir()) == [], what="no temp file left on the survivors")  # noqa: B023
