"""Knowing a digest grants nothing: pushed content is answered only from its local repositories, content one
upstream sent is answered under another upstream's names only once that upstream shows it holds it too, and a
cross-repository mount links a blob only from a repository the caller could read it from."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from tests.conftest import MirrorClient, MirrorFactory, fetches_done
from tests.fakes.registry import FakeRegistry
from tests.support.credentials import basic, make_htpasswd
from tests.support.plain_http import sha256
from tests.support.pushing import error_code, push_blob, push_image

Upstream = tuple[FakeRegistry, TestServer]


async def test_pushed_blob_is_not_served_under_a_pull_through_name(
    push_mirror: MirrorFactory, fake_upstream: Upstream
) -> None:
    fake, _ = fake_upstream
    client = await push_mirror()
    small, large = os.urandom(1000), os.urandom(200_000)  # answered from memory and from the file
    for data in (small, large):
        digest = await push_blob(client, "team/private", data)
        assert (await client.get(f"/v2/team/private/blobs/{digest}")).status == 200
        for method in ("GET", "HEAD"):
            resp = await client.request(method, f"/v2/library/anything/blobs/{digest}")
            assert resp.status == 404
            assert await error_code(resp) in ("BLOB_UNKNOWN", None)
        assert fake.count("HEAD", "blobs") >= 1  # the upstream was asked, and does not hold it


async def test_pushed_manifest_is_not_served_under_a_pull_through_name(
    push_mirror: MirrorFactory, fake_upstream: Upstream
) -> None:
    client = await push_mirror()
    manifest = await push_image(client, "team/private", "1.0", [os.urandom(500)])
    digest = sha256(manifest)
    assert (await client.get(f"/v2/team/private/manifests/{digest}")).status == 200
    resp = await client.get(f"/v2/library/anything/manifests/{digest}")
    assert resp.status == 404
    assert await error_code(resp) == "MANIFEST_UNKNOWN"


async def test_pushed_blob_the_upstream_also_holds_is_served_and_remembered(
    push_mirror: MirrorFactory, fake_upstream: Upstream
) -> None:
    fake, _ = fake_upstream
    client = await push_mirror()
    data = os.urandom(100_000)
    digest = await push_blob(client, "team/app", data)
    fake.add_blob(data)  # a public base layer that was also pushed
    resp = await client.get(f"/v2/library/base/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == data
    asked = len(fake.requests)
    assert fake.count("GET", "blobs") == 0  # confirmed with a HEAD, answered from the store
    resp = await client.get(f"/v2/library/base/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == data
    assert len(fake.requests) == asked  # remembered: no second upstream request


@pytest.mark.parametrize("while_fetching", [False, True], ids=["once stored", "while it is being fetched"])
async def test_content_of_one_upstream_is_not_served_through_another(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path, while_fetching: bool
) -> None:
    one, two = FakeRegistry(), FakeRegistry()
    servers = [await aiohttp_server(fake.app()) for fake in (one, two)]
    upstreams = (
        UpstreamConfig(registry="docker.io", url=str(servers[0].make_url("")), default=True, timeout=2.0),
        UpstreamConfig(registry="private.example", url=str(servers[1].make_url("")), timeout=2.0),
    )
    client: MirrorClient = await aiohttp_client(create_app(Config(data_dir=tmp_path / "data", upstreams=upstreams)))
    secret = os.urandom(200_000)
    digest = two.add_blob(secret)
    if while_fetching:
        two.faults.drip, two.faults.drip_pause = 10_000, 0.05  # about a second on the way
    first = asyncio.create_task(client.get(f"/v2/private.example/team/app/blobs/{digest}"))
    await asyncio.wait_for(two.blob_started.wait(), 10)
    if not while_fetching:
        resp = await first
        assert resp.status == 200 and await resp.read() == secret
    resp = await client.get(f"/v2/library/anything/blobs/{digest}")
    assert resp.status == 404 and await error_code(resp) == "BLOB_UNKNOWN"
    assert one.count("GET", "blobs") + one.count("HEAD", "blobs") == 1  # asked its own upstream, which lacks it
    if while_fetching:
        resp = await first
        assert resp.status == 200 and await resp.read() == secret


async def test_mount_links_only_what_the_source_could_give(push_mirror: MirrorFactory, fake_upstream: Upstream) -> None:
    fake, _ = fake_upstream
    client = await push_mirror()
    pushed = await push_blob(client, "team/a", os.urandom(3000))
    public = os.urandom(3000)
    pulled = fake.add_blob(public)
    resp = await client.get(f"/v2/library/base/blobs/{pulled}")
    assert resp.status == 200 and await resp.read() == public
    await fetches_done(client)  # the body ends once verified; the blob is stored just after

    async def mount(digest: str, source: str | None) -> int:
        query = f"mount={digest}" + (f"&from={source}" if source else "")
        return (await client.post(f"/v2/team/b/blobs/uploads/?{query}")).status

    assert await mount(pushed, None) == 202  # a digest alone: upload the bytes
    assert await mount(pushed, "library/base") == 202  # that name never held it
    assert await mount(pushed, "team/other") == 202  # nor does that one
    assert await mount(pushed, "team/a") == 201
    assert await mount(pulled, "library/base") == 201  # pulled-through content, from its own upstream


async def test_mount_needs_pull_permission_on_the_source(push_mirror: MirrorFactory, tmp_path: Path) -> None:
    htpasswd = make_htpasswd(tmp_path / "htpasswd", ("alice", "pw-a"), ("bob", "pw-b"))
    rules = [
        {"users": ["alice"], "repositories": ["alice/**"], "actions": ["pull", "push"]},
        {"users": ["bob"], "repositories": ["bob/**"], "actions": ["pull", "push"]},
    ]
    client = await push_mirror(htpasswd=htpasswd, extra={"access": rules})
    alice, bob = basic("alice", "pw-a"), basic("bob", "pw-b")
    digest = await push_blob(client, "alice/app", os.urandom(3000), headers=alice)
    resp = await client.post(f"/v2/bob/app/blobs/uploads/?mount={digest}&from=alice/app", headers=bob)
    assert resp.status == 202  # bob may not pull alice/app: he uploads the bytes himself
    resp = await client.post(f"/v2/alice/copy/blobs/uploads/?mount={digest}&from=alice/app", headers=alice)
    assert resp.status == 201
