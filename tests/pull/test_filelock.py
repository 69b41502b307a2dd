"""Fetch coordination across processes on one data dir (``pull.filelock``, ``storage.fetchlocks``).

In-process: two coordinators on two stores of one data dir stand for two processes (a ``flock`` is held per open
file, so they exclude each other as processes do); a dead holder is a real child process killed with SIGKILL.
Across processes: two real mirrors on one data dir in front of a real Distribution registry (slowed by nginx),
32 clients of a cold blob spread over both, and kill -9 of the one fetching.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.app import coordination
from mirror.config import Config, ConfigError
from mirror.oci import errors
from mirror.oci.reference import Digest
from mirror.pull.filelock import FileLocks
from mirror.pull.inflight import FetchState, InFlight
from mirror.storage.blobs import BlobStore
from mirror.storage.fetchlocks import FetchLocks
from tests.support.ops import (
    COORDINATED,
    Mirror,
    blob_files,
    eventually,
    record_figures,
    start_nginx,
    start_registry,
    upstream_requests,
    wait_until,
)
from tests.support.plain_http import push_blob

REGISTRY = "docker.io"
DATA = os.urandom(3 * 65536 + 17)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())


class Upstream:
    """A fetch's body written through the store as ``BlobPuller._fetch`` writes it, one piece per ``step``."""

    def __init__(self, store: BlobStore, data: bytes = DATA, fail_after: int | None = None):
        self.store = store
        self.data = data
        self.fail_after = fail_after  # pieces written before the fetch fails
        self.steps: asyncio.Queue[None] = asyncio.Queue()
        self.runs = 0

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.steps.put_nowait(None)

    async def run(self, fetch: FetchState) -> None:
        self.runs += 1
        writer = await asyncio.to_thread(self.store.fetch_writer, REGISTRY, fetch.digest)
        try:
            fetch.begin(len(self.data), writer.temp_path)
            for n, start in enumerate(range(0, len(self.data), 65536)):
                await self.steps.get()
                if n == self.fail_after:
                    raise OSError("upstream connection reset")
                await writer.write(self.data[start : start + 65536])
                fetch.advance(writer.written)
            await self.steps.get()  # the commit waits for one more step
            await writer.commit(fetch.digest, len(self.data))
        except BaseException:
            await writer.abort()
            raise
        fetch.finish(self.store.path(fetch.digest))


def never(fetch: FetchState) -> Any:
    raise AssertionError("a follower started a fetch of its own")


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[BlobStore, FileLocks, FileLocks]]:
    """One data dir, two coordinators on it (two stores: as two processes have)."""
    store = BlobStore(tmp_path)
    one, two = FileLocks(FetchLocks(store)), FileLocks(FetchLocks(BlobStore(tmp_path)))
    yield store, one, two
    await one.close()
    await two.close()


def leftovers(store: BlobStore) -> list[str]:
    return sorted(p.name for p in store.tmp_dir.iterdir())


async def test_a_follower_streams_the_leaders_file_and_ends_with_its_blob(
    pair: tuple[BlobStore, FileLocks, FileLocks],
) -> None:
    store, one, two = pair
    upstream = Upstream(store)
    leader, started = one.join(REGISTRY, DIGEST, upstream.run)
    assert started and one.join(REGISTRY, DIGEST, never) == (leader, False)  # one fetch per process, too
    await leader.wait_started()
    follower, _ = two.join(REGISTRY, DIGEST, never)
    await follower.wait_started()
    assert follower.size == len(DATA) and follower.temp_path == store.fetch_temp_path(REGISTRY, DIGEST)
    upstream.step(2)
    await eventually(lambda: follower.written == 2 * 65536, what="the follower at the leader's size")
    assert follower.readable() == 2 * 65536 - 1
    upstream.step(2)  # every byte written, the commit not yet: the last byte is held back
    await follower.wait_beyond(len(DATA) - 2)
    assert follower.readable() == len(DATA) - 1 and not follower.done
    upstream.step()
    await follower.wait_done()
    assert follower.error is None and follower.final_path == store.path(DIGEST)
    assert follower.readable() == len(DATA) and upstream.runs == 1
    assert store.path(DIGEST).read_bytes() == DATA
    await eventually(lambda: leftovers(store) == [], what="the lock file removed")


async def test_a_failed_leader_cuts_the_followers_clients(pair: tuple[BlobStore, FileLocks, FileLocks]) -> None:
    store, one, two = pair
    upstream = Upstream(store, fail_after=2)
    leader, _ = one.join(REGISTRY, DIGEST, upstream.run)
    await leader.wait_started()
    follower, _ = two.join(REGISTRY, DIGEST, never)
    upstream.step(2)
    await follower.wait_beyond(0)
    upstream.step()  # the upstream fails: the temp file goes, then the lock
    await follower.wait_done()
    assert isinstance(follower.error, errors.UpstreamUnavailable) and follower.final_path is None
    assert not store.path(DIGEST).exists()
    await eventually(lambda: leftovers(store) == [], what="temp and lock files removed")


async def hold(lock_path: Path, announce: str = "", then: str = "") -> asyncio.subprocess.Process:
    """Another process holding a fetch's lock (with ``announce``, having announced it); sent a line, it runs the
    Python statements ``then`` (``fd`` is its lock file) and prints "done"."""
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"os.write(fd, {announce.encode()!r})\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
        f"{then}\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and await proc.stdout.readline() == b"held\n"
    return proc


async def killed(proc: asyncio.subprocess.Process) -> None:
    proc.kill()  # SIGKILL: the kernel releases its lock, nothing else is cleaned
    await proc.wait()


def lock_path(store: BlobStore) -> Path:
    return store.tmp_dir / f"lock-{store.fetch_key(REGISTRY, DIGEST)}"


async def test_a_holder_that_died_before_announcing_is_taken_over(
    pair: tuple[BlobStore, FileLocks, FileLocks],
) -> None:
    store, one, _ = pair
    temp = store.fetch_temp_path(REGISTRY, DIGEST)
    temp.write_bytes(b"garbage of the dead holder")
    proc = await hold(lock_path(store))
    upstream = Upstream(store)
    fetch, _ = one.join(REGISTRY, DIGEST, upstream.run)
    await eventually(lambda: upstream.runs == 0 and not fetch.done, what="following")
    await killed(proc)
    upstream.step(5)
    await fetch.wait_done()
    assert fetch.error is None and upstream.runs == 1
    assert store.path(DIGEST).read_bytes() == DATA
    await eventually(lambda: leftovers(store) == [], what="temp and lock files removed")


async def test_a_holder_that_died_mid_blob_never_completes_a_client(
    pair: tuple[BlobStore, FileLocks, FileLocks],
) -> None:
    store, one, _ = pair
    temp = store.fetch_temp_path(REGISTRY, DIGEST)
    temp.write_bytes(b"x" * (len(DATA) - 1))  # all but one byte, and wrong
    proc = await hold(lock_path(store), f"{len(DATA)} {os.stat(temp).st_ino}\n")
    fetch, _ = one.join(REGISTRY, DIGEST, never)
    await fetch.wait_started()
    await fetch.wait_beyond(len(DATA) - 3)
    assert fetch.readable() == len(DATA) - 2 and not fetch.done
    await killed(proc)
    await fetch.wait_done()
    assert isinstance(fetch.error, errors.UpstreamUnavailable) and fetch.final_path is None
    assert not store.path(DIGEST).exists()
    await eventually(lambda: leftovers(store) == [], what="the dead holder's files removed")


async def tell(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    assert await proc.stdout.readline() == b"done\n"


async def test_a_fetch_started_again_under_a_follower_cuts_its_clients(
    pair: tuple[BlobStore, FileLocks, FileLocks],
) -> None:
    """The temp file a follower's clients read is replaced (another holder began anew): they are cut."""
    store, one, _ = pair
    temp = store.fetch_temp_path(REGISTRY, DIGEST)
    temp.write_bytes(DATA[:1000])
    restart = (
        f"os.unlink({str(temp)!r}); open({str(temp)!r}, 'wb').write({DATA[:10]!r})\n"
        f"os.ftruncate(fd, 0); os.pwrite(fd, b'{len(DATA)} %d' % os.stat({str(temp)!r}).st_ino, 0)"
    )
    proc = await hold(lock_path(store), f"{len(DATA)} {os.stat(temp).st_ino}", then=restart)
    try:
        fetch, _ = one.join(REGISTRY, DIGEST, never)
        await fetch.wait_beyond(998)
        await tell(proc)
        async with asyncio.timeout(10):
            await fetch.wait_done()
        assert isinstance(fetch.error, errors.UpstreamUnavailable) and fetch.final_path is None
    finally:
        await killed(proc)


async def test_a_follower_whose_file_was_not_the_one_published_cuts_its_clients(
    pair: tuple[BlobStore, FileLocks, FileLocks],
) -> None:
    """Clients read a whole wrong file; the right blob is published from another file: the wrong one is never
    completed (its last byte stays held back and the fetch fails)."""
    store, one, _ = pair
    temp, final, right = store.fetch_temp_path(REGISTRY, DIGEST), store.path(DIGEST), store.tmp_dir / "right"
    temp.write_bytes(b"x" * len(DATA))
    right.write_bytes(DATA)
    publish = (
        f"os.makedirs({str(final.parent)!r}, exist_ok=True); os.replace({str(right)!r}, {str(final)!r})\n"
        f"os.unlink({str(temp)!r}); os.close(fd)"
    )
    proc = await hold(lock_path(store), f"{len(DATA)} {os.stat(temp).st_ino}", then=publish)
    try:
        fetch, _ = one.join(REGISTRY, DIGEST, never)
        await fetch.wait_beyond(len(DATA) - 2)
        assert fetch.readable() == len(DATA) - 1
        await tell(proc)
        async with asyncio.timeout(10):
            await fetch.wait_done()
        assert isinstance(fetch.error, errors.UpstreamUnavailable) and fetch.final_path is None
        assert fetch.readable() == len(DATA) - 1
    finally:
        await killed(proc)


async def test_start_up_cleaning_keeps_the_files_of_fetches_other_processes_hold(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    locks = FetchLocks(store)
    held = Digest("sha256", "1" * 64)
    held_temp = store.fetch_temp_path(REGISTRY, held)
    held_temp.write_bytes(b"being fetched")
    store.fetch_temp_path(REGISTRY, DIGEST).write_bytes(b"of a dead process")
    lock_path(store).touch()
    proc = await hold(store.tmp_dir / f"lock-{store.fetch_key(REGISTRY, held)}")
    try:
        assert await asyncio.to_thread(locks.clean_sync) == 1
        assert leftovers(store) == sorted([held_temp.name, f"lock-{store.fetch_key(REGISTRY, held)}"])
    finally:
        await killed(proc)


@pytest.mark.parametrize(
    ("setting", "kind"),
    [("process", InFlight), ("files", FileLocks)],
    ids=["process (the default) -> in-process single flight", "files -> file locks across processes"],
)
def test_the_coordination_setting_picks_the_coordinator(tmp_path: Path, setting: str, kind: type) -> None:
    assert Config().coordination == "process"
    inflight, _ = coordination(Config(data_dir=tmp_path, coordination=setting), BlobStore(tmp_path))
    assert isinstance(inflight, kind)


def test_an_unknown_coordination_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="coordination"):
        coordination(Config(data_dir=tmp_path, coordination="redis"), BlobStore(tmp_path))


# --- two real mirror processes on one data dir ------------------------------------------------------------------
BIG = 8 * 2**20


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("filelock")
    registry, url = start_registry(work / "registry", access_log=True)
    herd_nginx, herd_url = start_nginx(work / "nginx-herd", url, throttle="8m")  # ~1 s for the blob
    slow_nginx, slow_url = start_nginx(work / "nginx-slow", url, throttle="1m")  # ~8 s
    try:
        yield {"log": work / "registry" / "registry.log", "herd": herd_url, "slow": slow_url, "url": url}
    finally:
        slow_nginx.stop()
        herd_nginx.stop()
        registry.stop()


def two_mirrors(data: Path, url: str) -> tuple[Mirror, Mirror]:
    first = Mirror(data, url, entry=COORDINATED)
    try:
        return first, Mirror(data, url, entry=COORDINATED)
    except BaseException:
        first.stop()
        raise


def blob_url(mirror: Mirror, repo: str, digest: str) -> str:
    return f"{mirror.url}/v2/{repo}/blobs/{digest}"


def served_from_upstream(mirror: Mirror) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in mirror.metrics().splitlines()
        if line.startswith("mirror_blob_bytes_served_total{") and 'source="upstream"' in line
    )


@pytest.mark.integration
async def test_32_cold_gets_over_two_processes_make_one_upstream_get(upstream: dict[str, Any], tmp_path: Path) -> None:
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/herd", data)
    first, second = two_mirrors(tmp_path / "data", upstream["herd"])
    try:
        async with aiohttp.ClientSession() as session:

            async def get(mirror: Mirror) -> str:
                async with session.get(blob_url(mirror, "library/herd", digest)) as resp:
                    assert resp.status == 200
                    return hashlib.sha256(await resp.read()).hexdigest()

            began = time.monotonic()
            bodies = await asyncio.gather(*(get(first if n % 2 else second) for n in range(32)))
            record_figures("filelock herd", clients=32, processes=2, seconds=round(time.monotonic() - began, 3))
        assert bodies == [digest.partition(":")[2]] * 32  # every body verified
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1
        # Both processes streamed the blob while it arrived: the one without the upstream GET followed the other.
        assert served_from_upstream(first) == served_from_upstream(second) == 16 * BIG
        assert blob_files(tmp_path / "data")[digest] == BIG
        assert leftovers(BlobStore(tmp_path / "data")) == []
    finally:
        first.stop()
        second.stop()


@pytest.mark.integration
async def test_kill_9_of_the_fetching_process_never_serves_wrong_bytes(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    data = os.urandom(BIG)
    digest = push_blob(upstream["url"], "library/crash", data)
    store = tmp_path / "data"
    leader, follower = two_mirrors(store, upstream["slow"])
    received = [0] * 9
    try:
        async with aiohttp.ClientSession() as session:

            async def get(mirror: Mirror, n: int) -> str:
                hasher = hashlib.sha256()
                async with session.get(blob_url(mirror, "library/crash", digest)) as resp:
                    assert resp.status == 200
                    async for chunk in resp.content.iter_any():
                        hasher.update(chunk)
                        received[n] += len(chunk)
                return hasher.hexdigest()

            first = asyncio.ensure_future(get(leader, 0))
            await eventually(lambda: received[0] > 0, what="the leader streaming")
            rest = [asyncio.ensure_future(get(follower, n)) for n in range(1, 9)]
            await eventually(lambda: all(received[1:]), what="the follower's clients streaming")
            leader.kill9()
            outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        cut = [o for o in outcomes if isinstance(o, aiohttp.ClientError)]  # a short body, the connection cut
        whole = [o for o in outcomes if isinstance(o, str)]
        assert len(cut) + len(whole) == 9, outcomes
        assert whole == [digest.partition(":")[2]] * len(whole), "a complete body is always the right one"
        assert all(received[n] < BIG for n, o in enumerate(outcomes) if not isinstance(o, str))
        assert digest not in blob_files(store), "nothing partial published"
        wait_until(lambda: leftovers(BlobStore(store)) == [], what="the dead fetch's files removed")
        async with aiohttp.ClientSession() as session, session.get(blob_url(follower, "library/crash", digest)) as r:
            assert r.status == 200 and hashlib.sha256(await r.read()).hexdigest() == digest.partition(":")[2]
        assert (
            upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 2
        )  # taken over from scratch (resuming with Range is still to come)
        assert blob_files(store)[digest] == BIG
    finally:
        leader.stop()
        follower.stop()
