"""Manifests and tags across real mirror processes sharing one data dir (``Config.coordination = "files"``), in
front of a real Distribution registry: the whole host asks the upstream about a tag (and a manifest by digest) once
at a time (``storage.reflocks``), and a tag one process revalidated is what another serves once its own copy is
past the TTL (the in-memory copy never outlives the tag's TTL)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from mirror.storage.reflocks import RefLocks
from tests.support.lockholder import hold, killed
from tests.support.ops import Mirror, coordinated_mirrors, start_nginx, start_registry, upstream_requests
from tests.support.plain_http import OCI_INDEX, OCI_MANIFEST, push_random_image

TTL = 2.0
# nginx holds each request that comes sooner than 1/4 s after the one before: after a request of the test's
# own, the next upstream request (the revalidation) is under way for about 1/4 s, while every client has asked.
PACED = "limit_req_zone $server_port zone=paced:1m rate=4r/s;"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("tags")
    registry, url = start_registry(work / "registry", access_log=True)
    nginx, paced = start_nginx(work / "nginx", url, "limit_req zone=paced burst=1000;", http=PACED)
    try:
        yield {"log": work / "registry" / "registry.log", "url": url, "paced": paced}
    finally:
        nginx.stop()
        registry.stop()


async def manifest_digest(session: aiohttp.ClientSession, mirror: Mirror, repo: str, ref: str) -> str:
    url = f"{mirror.url}/v2/{repo}/manifests/{ref}"
    async with session.get(url, headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["Docker-Content-Digest"]


def asked(log: Path, repo: str, ref: str) -> int:
    """Upstream requests (HEAD or GET) for ``repo``'s manifest ``ref``."""
    path = f"/v2/{repo}/manifests/{ref}"
    return upstream_requests(log, "HEAD", path) + upstream_requests(log, "GET", path)


async def past(deadline: float) -> None:
    """Until the wall clock passes ``deadline``: a TTL running out is no event that can be awaited."""
    await asyncio.sleep(max(0.0, deadline - time.time()) + 0.05)


@pytest.mark.integration
async def test_32_gets_of_an_expired_tag_over_two_processes_ask_the_upstream_once(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    repo = "library/herdtag"
    push_random_image(upstream["url"], repo, "latest", [os.urandom(1000)])
    mirrors = coordinated_mirrors(tmp_path / "data", upstream["paced"], "--tag-ttl", str(TTL))
    try:
        async with aiohttp.ClientSession() as session:
            await manifest_digest(session, mirrors[0], repo, "latest")  # cached by one process
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
        assert asked(upstream["log"], repo, "latest") - before == 1, "one revalidation for the whole host"
        assert upstream_requests(upstream["log"], "GET", f"/v2/{repo}/manifests/{new}") == 1
    finally:
        for mirror in mirrors:
            mirror.stop()


@pytest.mark.integration
async def test_a_tag_revalidated_by_one_process_is_served_new_by_the_other_past_its_ttl(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    repo = "library/movingtag"
    old = push_random_image(upstream["url"], repo, "latest", [os.urandom(1000)])["manifest"]
    one, two = coordinated_mirrors(tmp_path / "data", upstream["url"], "--tag-ttl", str(TTL))
    try:
        async with aiohttp.ClientSession() as session:
            assert await manifest_digest(session, one, repo, "latest") == old
            expires = time.time() + TTL
            assert await manifest_digest(session, two, repo, "latest") == old  # the other's record, now in memory
            new = push_random_image(upstream["url"], repo, "latest", [os.urandom(1000)])["manifest"]
            before = asked(upstream["log"], repo, "latest")
            await past(expires)
            assert await manifest_digest(session, one, repo, "latest") == new  # revalidated: changed
            assert await manifest_digest(session, two, repo, "latest") == new  # from the index, not its memory
        assert asked(upstream["log"], repo, "latest") - before == 1, "the second process asked nothing"
        assert upstream_requests(upstream["log"], "GET", f"/v2/{repo}/manifests/{new}") == 1
    finally:
        one.stop()
        two.stop()


async def test_a_client_waits_no_longer_than_the_timeout_for_another_process_s_revalidation(
    upstream: dict[str, Any], aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """Another process holds the tag's lock (revalidating it, slowly) for longer than the upstream timeout: the
    client gets the stale answer at the timeout, as if it had asked the upstream itself and it had been slow; the
    timeout is not spent twice (once waiting for the lock, once on a request of its own)."""
    repo, timeout = "library/heldtag", 1.0
    old = push_random_image(upstream["url"], repo, "latest", [os.urandom(1000)])["manifest"]
    config = Config(
        data_dir=tmp_path / "data",
        coordination="files",
        upstreams=(UpstreamConfig(url=upstream["url"], default=True, tag_ttl=0.2, timeout=timeout),),
    )
    client = await aiohttp_client(create_app(config))
    accept = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
    async with client.get(f"/v2/{repo}/manifests/latest", headers=accept) as resp:
        assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == old
    expires = time.time() + 0.2
    new = push_random_image(upstream["url"], repo, "latest", [os.urandom(1000)])["manifest"]
    before = asked(upstream["log"], repo, "latest")
    holder = await hold(RefLocks(tmp_path / "data" / "tmp").path(f"tag docker.io {repo} latest"))
    try:
        await past(expires)
        began = time.monotonic()
        async with client.get(f"/v2/{repo}/manifests/latest", headers=accept) as resp:
            waited = time.monotonic() - began
            assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == old
            assert resp.headers["X-Mirror-Stale"] == "true"
        assert timeout <= waited < 1.8 * timeout, waited
        assert asked(upstream["log"], repo, "latest") == before
    finally:
        await killed(holder)
    async with client.get(f"/v2/{repo}/manifests/latest", headers=accept) as resp:  # the lock free: revalidated
        assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == new
