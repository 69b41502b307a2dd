"""The fetch-coordination seam: the miss path starts, joins and looks up fetches only through the
``FetchCoordinator`` it is given, so a cross-process (file locks) or cross-replica (Redis leases) implementation
can replace the in-process one without touching it."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from mirror.content import MemoryBlob, StoredBlob
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, Repo
from mirror.pull.inflight import FetchRun, FetchState, InFlight, RemoteFetch
from mirror.pull.service import PullThrough, TagPolicy
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index
from mirror.upstream.client import UpstreamClient, UpstreamSettings
from tests.fakes.registry import FakeRegistry

REPO = Repo("docker.io", "library/app")


class Recording:
    """A coordinator that records every call and delegates to the in-process one."""

    def __init__(self) -> None:
        self.inner = InFlight()
        self.calls: list[str] = []

    def join(self, registry: str, digest: Digest, run: FetchRun, repo: str = "") -> tuple[FetchState, bool]:
        fetch, started = self.inner.join(registry, digest, run, repo)
        self.calls.append("start" if started else "join")
        return fetch, started

    def get(self, registry: str, digest: Digest) -> FetchState | None:
        self.calls.append("get")
        return self.inner.get(registry, digest)

    def fetching(self, digest: Digest) -> bool:
        return self.inner.fetching(digest)

    async def announced(self, registry: str, digest: Digest) -> int | None:
        self.calls.append("announced")
        return await self.inner.announced(registry, digest)

    def under_way(self) -> list[tuple[str, FetchState]]:
        return self.inner.under_way()

    async def elsewhere(self) -> list[RemoteFetch]:
        return await self.inner.elsewhere()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
async def pull(fake_upstream: tuple[FakeRegistry, TestServer], tmp_path: Path) -> AsyncIterator[PullThrough]:
    _, server = fake_upstream
    metrics = Metrics()
    client = UpstreamClient(UpstreamSettings("docker.io", str(server.make_url("")), timeout=5.0), metrics)
    index = Index(tmp_path)
    service = PullThrough(
        BlobStore(tmp_path), index, {"docker.io": client}, {"docker.io": TagPolicy()}, metrics, inflight=Recording()
    )
    yield service
    await service.close()
    await client.close()
    index.close()


async def test_concurrent_misses_start_one_fetch_through_the_given_coordinator(
    fake_upstream: tuple[FakeRegistry, TestServer], pull: PullThrough
) -> None:
    fake, _ = fake_upstream
    data = b"layer " * 50_000
    digest = Digest.parse(fake.add_blob(data))
    coordinator = pull.inflight
    assert isinstance(coordinator, Recording)
    answers = await asyncio.gather(*(pull.blob(REPO, digest) for _ in range(3)))
    assert sorted(coordinator.calls) == ["join", "join", "start"]
    assert fake.count("GET", "blobs") == 1
    for answer in answers:
        if isinstance(answer, StoredBlob):  # asked once the bytes were verified: answered as the stored blob
            path = answer.path
        else:
            assert not isinstance(answer, MemoryBlob | int)
            await answer.wait_done()
            assert answer.error is None and answer.final_path is not None
            path = answer.final_path
        assert hashlib.sha256(await asyncio.to_thread(path.read_bytes)).hexdigest() == digest.hex
    assert not coordinator.fetching(digest)
    assert isinstance(await pull.blob(REPO, digest), StoredBlob)  # a hit: the coordinator is not asked
    assert len(coordinator.calls) == 3


async def test_a_head_looks_up_the_fetch_and_never_starts_one(
    fake_upstream: tuple[FakeRegistry, TestServer], pull: PullThrough
) -> None:
    fake, _ = fake_upstream
    digest = Digest.parse(fake.add_blob(b"config"))
    coordinator = pull.inflight
    assert isinstance(coordinator, Recording)
    assert await pull.blob_head(REPO, digest) == len(b"config")  # the size the upstream announces
    assert coordinator.calls == ["get", "announced"]  # this process, then the others
    assert fake.count("GET", "blobs") == 0


async def test_a_failed_fetch_still_winding_down_is_never_joined(tmp_path: Path) -> None:
    """Between a fetch failing and its task leaving the table, a new client must get a new fetch: joining the
    dead one would cut it right after the headers."""
    inflight = InFlight()
    digest = Digest.parse("sha256:" + "1" * 64)
    failed, winding_down, second_may_end = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def fails_then_lingers(fetch: FetchState) -> None:
        fetch.begin(10, tmp_path / "temp")
        fetch.advance(5)
        fetch.fail(RuntimeError("upstream cut"))
        failed.set()
        await winding_down.wait()  # cleanup still running: the fetch is still in the table

    async def runs(fetch: FetchState) -> None:
        await second_may_end.wait()

    first, _ = inflight.join("docker.io", digest, fails_then_lingers)
    await failed.wait()
    second, started = inflight.join("docker.io", digest, runs)
    assert started and second is not first and second.error is None
    winding_down.set()
    for _ in range(10):  # let the first task finish its clean-up
        await asyncio.sleep(0)
    assert inflight.get("docker.io", digest) is second  # the first task's clean-up left the new fetch in place
    second_may_end.set()
    await inflight.close()
