"""Fetch coordination across processes on one data dir (``pull.filelock``, ``storage.fetchlocks``).

Two coordinators on two stores of one data dir stand for two processes (a ``flock`` is held per open file, so they
exclude each other as processes do); a dead holder is a real child process killed with SIGKILL. Real mirror
processes: tests/pull/test_filelock_processes.py; resuming a dead holder's fetch: tests/pull/test_resume.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mirror.backends import coordination
from mirror.config import Config, ConfigError
from mirror.oci import errors
from mirror.oci.reference import Digest
from mirror.pull.filelock import FileLocks
from mirror.pull.inflight import FetchState, InFlight
from mirror.storage.blobs import BlobStore
from mirror.storage.fetchlocks import FetchLocks
from tests.support.lockholder import hold, killed, tell
from tests.support.ops import eventually

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
            await writer.commit(fetch.digest, len(self.data), verified=fetch.verify)
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


async def test_a_followers_clients_get_the_last_byte_once_the_leader_verified_it_not_once_published(
    pair: tuple[BlobStore, FileLocks, FileLocks], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, one, two = pair
    release, publish = asyncio.Event(), store.publish_file

    async def slow_publish(temp_path: Path, digest: Digest) -> None:  # a slow fsync and rename
        await release.wait()
        await publish(temp_path, digest)

    monkeypatch.setattr(store, "publish_file", slow_publish)
    upstream = Upstream(store)
    leader, _ = one.join(REGISTRY, DIGEST, upstream.run)
    await leader.wait_started()
    follower, _ = two.join(REGISTRY, DIGEST, never)
    await follower.wait_started()
    upstream.step(5)  # every piece, then the commit: verified, its publish held
    try:
        await asyncio.wait_for(follower.wait_beyond(len(DATA) - 1), 10)
        assert follower.readable() == len(DATA) and follower.verified and not follower.done
        assert not store.path(DIGEST).exists(), "published only after the follower's clients may finish"
    finally:
        release.set()
    await follower.wait_done()
    assert follower.error is None and follower.final_path == store.path(DIGEST)
    assert store.path(DIGEST).read_bytes() == DATA and upstream.runs == 1


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


@pytest.mark.parametrize("on_disk", [len(DATA) // 2, len(DATA)], ids=["half the blob", "every byte"])
async def test_a_holder_that_died_mid_blob_is_continued_by_a_follower(
    pair: tuple[BlobStore, FileLocks, FileLocks], on_disk: int
) -> None:
    """The follower takes the key and runs the fetch with ``resume`` on the dead holder's file (``pull.resume``
    continues it; tests/pull/test_resume.py). If that fails too, its clients are cut: they never got the last
    byte."""
    store, one, _ = pair
    temp = store.fetch_temp_path(REGISTRY, DIGEST)
    temp.write_bytes(b"x" * on_disk)  # wrong bytes: the resumed fetch's digest check fails
    proc = await hold(lock_path(store), f"{len(DATA)} {os.stat(temp).st_ino}\n")
    asked: list[tuple[bool, int, int]] = []

    async def resumed(fetch: FetchState) -> None:
        asked.append((fetch.resume, fetch.written, os.stat(temp).st_ino))
        raise OSError("digest mismatch")

    fetch, _ = one.join(REGISTRY, DIGEST, resumed)
    await fetch.wait_started()
    await fetch.wait_beyond(on_disk - 2)
    assert fetch.readable() == on_disk - 1 and not fetch.done and asked == []
    inode = os.stat(temp).st_ino
    await killed(proc)
    await fetch.wait_done()
    assert asked == [(True, on_disk, inode)], "continued from the bytes on disk, in the same file"
    assert isinstance(fetch.error, OSError) and fetch.final_path is None
    assert fetch.readable() == on_disk - 1
    assert not store.path(DIGEST).exists()


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
