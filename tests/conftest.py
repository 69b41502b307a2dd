"""Fixtures for in-process tests: the mirror app on a real aiohttp test server, with a fake upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mirror.api.keys import PULL
from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from tests.fakes.registry import FakeRegistry

# A client of a mirror application on a real test server (what ``aiohttp_client(create_app(...))`` returns).
MirrorClient = TestClient[web.Request, web.Application]
MirrorFactory = Callable[..., Awaitable[MirrorClient]]


@pytest.fixture
async def fake_upstream(aiohttp_server: AiohttpServer) -> tuple[FakeRegistry, TestServer]:
    fake = FakeRegistry()
    server = await aiohttp_server(fake.app())
    return fake, server


@pytest.fixture
def make_mirror(aiohttp_client: AiohttpClient, tmp_path: Path) -> MirrorFactory:
    """``await make_mirror(url, tag_ttl=..., ...)``: a client for a mirror whose default upstream is ``url``."""

    async def make(url: str, data_dir: Path | None = None, **upstream: Any) -> MirrorClient:
        config = Config(
            data_dir=data_dir or tmp_path / "data",
            upstreams=(UpstreamConfig(registry="docker.io", url=url, default=True, **upstream),),
        )
        return await aiohttp_client(create_app(config))

    return make


@pytest.fixture
async def mirror_and_fake(
    fake_upstream: tuple[FakeRegistry, TestServer], make_mirror: MirrorFactory
) -> tuple[MirrorClient, FakeRegistry]:
    fake, server = fake_upstream
    client = await make_mirror(str(server.make_url("")), timeout=2.0)
    return client, fake


@pytest.fixture
def push_mirror(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_upstream: tuple[FakeRegistry, TestServer]
) -> MirrorFactory:
    """``await push_mirror(**settings)``: a mirror to push to (Config settings as keywords; the fake upstream is its
    default upstream, so tests can count what reaches it)."""
    from tests.support.pushing import mirror_config

    _, server = fake_upstream

    async def make(data_dir: Path | None = None, **settings: Any) -> MirrorClient:
        config = mirror_config(data_dir or tmp_path / "data", str(server.make_url("")), **settings)
        return await aiohttp_client(create_app(config))

    return make


async def fetches_done(client: MirrorClient, within: float = 10.0) -> None:
    """Until every blob fetch the mirror runs has ended. A client's body ends as soon as its blob is verified; the
    store publishes it just after (fsync, rename, the index and the usage table): a test that looks at the store
    right after a cold GET waits for this first."""
    inflight = client.app[PULL].inflight
    async with asyncio.timeout(within):
        while inflight.under_way():  # noqa: ASYNC110 - the mirror's own table, polled from outside it
            await asyncio.sleep(0.01)
