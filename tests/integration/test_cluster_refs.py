"""Manifests and tags across replicas: two real ``mirror serve`` replicas sharing a real SeaweedFS bucket and a real
Redis, in front of a real Distribution paced by nginx. The whole cluster asks the upstream about a tag once at a
time (``storage.redislocks``): 32 GETs of an expired tag spread over both replicas make one revalidation and one
GET of the new manifest, and every client gets the new digest."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.pull.test_tag_processes import PACED, TTL, asked, manifest_digest, past
from tests.support.cluster import replica_config
from tests.support.ops import Mirror, free_port, start_nginx, start_registry, upstream_requests
from tests.support.plain_http import push_random_image
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture
from tests.support.seaweed import Seaweed, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("refs")
    registry, url = start_registry(work / "registry", access_log=True)
    nginx, paced = start_nginx(work / "nginx", url, "limit_req zone=paced burst=1000;", http=PACED)
    try:
        yield {"log": work / "registry" / "registry.log", "url": url, "paced": paced}
    finally:
        nginx.stop()
        registry.stop()


def replicas(stack: ExitStack, work: Path, upstream: str, seaweed: Seaweed, redis: RedisServer) -> list[Mirror]:
    prefix = f"refs-{secrets.token_hex(4)}/"
    started = []
    for n in range(2):
        listen = f"127.0.0.1:{free_port()}"
        config = replica_config(work / f"replica-{n}.toml", seaweed, redis.url, prefix, f"http://{listen}")
        mirror = Mirror(work / f"data-{n}", upstream, "--config", str(config), "--tag-ttl", str(TTL), listen=listen)
        started.append(stack.enter_context(mirror))
    return started


async def test_32_gets_of_an_expired_tag_over_two_replicas_ask_the_upstream_once(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path: Path
) -> None:
    repo = "library/clustertag"
    push_random_image(upstream["url"], repo, "latest", [os.urandom(1000)])
    with ExitStack() as stack:
        mirrors = replicas(stack, tmp_path, upstream["paced"], seaweed, redis_server)
        async with aiohttp.ClientSession() as session:
            await manifest_digest(session, mirrors[0], repo, "latest")  # cached through one replica
            expires = time.time() + TTL
            new = push_random_image(upstream["url"], repo, "latest", [os.urandom(1000)])["manifest"]
            before = asked(upstream["log"], repo, "latest")
            await past(expires)
            async with session.get(upstream["paced"] + "/v2/") as resp:
                assert resp.status == 200  # the next upstream request is held by nginx for about 1/4 s
            answers = await asyncio.gather(
                *(manifest_digest(session, mirrors[n % 2], repo, "latest") for n in range(32))
            )
        assert answers == [new] * 32
        assert asked(upstream["log"], repo, "latest") - before == 1, "one revalidation for the whole cluster"
        assert upstream_requests(upstream["log"], "GET", f"/v2/{repo}/manifests/{new}") == 1
