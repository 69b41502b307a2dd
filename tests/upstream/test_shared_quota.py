"""The upstream's quota window is shared by the processes on one data dir, and by the replicas of a cluster: one
process told to hold back (a 429, or ``ratelimit-remaining`` below the threshold) pauses tag revalidation in all
of them.

Two real mirror processes (``COORDINATED``) on one data dir, or two replicas on a real SeaweedFS bucket and a real
Redis, in front of the in-process fake upstream: a real Distribution cannot answer 429 or send Docker Hub's
ratelimit headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from mirror.storage.cluster import RedisLink
from mirror.storage.quotas import QuotaFile
from mirror.storage.redisquota import RedisQuota
from tests.fakes.registry import FakeRegistry
from tests.support.cluster import replica_config
from tests.support.ops import COORDINATED, Mirror, eventually, free_port
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture
from tests.support.seaweed import Seaweed, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture
from tests.test_routing import sample

TAG = "/v2/library/alpine/manifests/3"


@pytest.fixture
def two(tmp_path: Path, fake_upstream: tuple[FakeRegistry, TestServer]) -> Iterator[tuple[Mirror, Mirror]]:
    """Two processes on one data dir, every tag revalidated on every request (TTL 0)."""
    _, server = fake_upstream
    url = str(server.make_url("")).rstrip("/")
    first = Mirror(tmp_path / "data", url, "--tag-ttl", "0", entry=COORDINATED)
    try:
        second = Mirror(tmp_path / "data", url, "--tag-ttl", "0", entry=COORDINATED)
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


async def get(mirror: Mirror, path: str = TAG) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session, session.get(mirror.url + path) as resp:
        await resp.read()
        return resp


def deferred(mirror: Mirror, reason: str) -> float:
    return sample(mirror.metrics(), "mirror_ratelimit_deferred_total", upstream="docker.io", reason=reason)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        pytest.param({"rate_limited": "3600"}, "rate_limited", id="a 429 through A -> B serves the tag unasked"),
        pytest.param({"ratelimit_remaining": 3}, "low_quota", id="3 pulls left seen by A -> B serves the tag unasked"),
    ],
)
async def test_one_process_holding_back_pauses_revalidation_in_the_other(
    fake_upstream: tuple[FakeRegistry, TestServer],
    two: tuple[Mirror, Mirror],
    tmp_path: Path,
    fault: dict[str, object],
    reason: str,
) -> None:
    fake, _ = fake_upstream
    a, b = two
    fake.add_image("library/alpine", "3", [b"alpine layer"])
    assert (await get(a)).status == 200  # cached (the index is on the shared data dir)
    for key, value in fault.items():
        setattr(fake.faults, key, value)
    assert (await get(a)).status == 200  # A's HEAD gets the fault: A starts holding back
    record = QuotaFile(tmp_path / "data", "docker.io")
    await eventually(lambda: record.read_sync()[1] == reason, what="the shared record written")

    asked = len(fake.requests)
    for _ in range(3):
        resp = await get(b)  # the tag is expired (TTL 0): alone, B would revalidate it
        assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == fake.add_image(
            "library/alpine", "3", [b"alpine layer"]
        )
    assert len(fake.requests) == asked, "B asked the upstream although A had been told to hold back"
    assert deferred(b, reason) == 3


async def test_the_window_ends_for_every_process_when_pulls_are_back(
    fake_upstream: tuple[FakeRegistry, TestServer], two: tuple[Mirror, Mirror], tmp_path: Path
) -> None:
    fake, _ = fake_upstream
    a, b = two
    fake.add_image("library/alpine", "3", [b"alpine layer"])
    fake.add_image("library/busybox", "1", [b"busybox layer"])
    fake.faults.ratelimit_remaining = 3
    assert (await get(a)).status == 200  # a cold tag goes upstream whatever the quota; A learns it is low
    record = QuotaFile(tmp_path / "data", "docker.io")
    await eventually(lambda: record.read_sync()[1] == "low_quota", what="the shared record written")
    fake.faults.ratelimit_remaining = 80
    # Content the cache lacks still goes upstream; its answer says the window moved on, and A says so to all.
    assert (await get(a, "/v2/library/busybox/manifests/1")).status == 200
    await eventually(lambda: record.read_sync()[0] == 0.0, what="the shared record cleared")
    heads = fake.count("HEAD", "manifests")
    assert (await get(b)).status == 200
    assert fake.count("HEAD", "manifests") == heads + 1  # B revalidates again (TTL 0)


async def test_one_replica_seeing_a_429_pauses_revalidation_in_the_other(
    fake_upstream: tuple[FakeRegistry, TestServer], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake, server = fake_upstream
    url = str(server.make_url("")).rstrip("/")
    replicas = []
    try:
        for n in range(2):
            listen = f"127.0.0.1:{free_port()}"
            config = replica_config(
                tmp_path / f"{n}.toml", seaweed, redis_server.url, f"{tmp_path.name}/", f"http://{listen}"
            )
            replicas.append(
                Mirror(tmp_path / f"data-{n}", url, "--config", str(config), "--tag-ttl", "0", listen=listen)
            )
        a, b = replicas
        fake.add_image("library/alpine", "3", [b"alpine layer"])
        assert (await get(a)).status == 200  # cached in the shared index
        fake.faults.rate_limited = "3600"
        assert (await get(a)).status == 200  # A's revalidation gets the 429: A holds back, and says so in Redis
        link = RedisLink.connect(redis_server.url)
        try:
            record = RedisQuota(link, "docker.io")
            await eventually(lambda: record.read_sync()[1] == "rate_limited", what="the record in Redis")
        finally:
            await link.close()
        asked = len(fake.requests)
        for _ in range(3):
            assert (await get(b)).status == 200  # expired (TTL 0): alone, B would revalidate it
        assert len(fake.requests) == asked, "B asked the upstream although A had been told to hold back"
        assert deferred(b, "rate_limited") == 3
    finally:
        for mirror in replicas:
            mirror.stop()
