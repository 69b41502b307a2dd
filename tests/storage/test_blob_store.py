"""The store's own file operations, which eviction, gc, verify and the admin commands go through: delete, read,
withdraw and remove (eviction), walk, re-hash, quarantine and temp sweeps. In process, on a real directory."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest

from mirror.oci.reference import Digest
from mirror.storage.blobs import BlobStore
from mirror.storage.eviction import Limits
from mirror.storage.housekeeper import Housekeeper
from mirror.storage.index import Index
from mirror.storage.usage import Usage


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


async def test_delete_removes_the_file_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = await store.put(b"layer")
    assert await store.delete(digest) is True
    assert await store.size(digest) is None
    assert store.delete_sync(digest) is False  # already gone


async def test_read_sync_answers_content_or_none(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = await store.put(b"manifest")
    assert store.read_sync(digest) == b"manifest"
    assert store.read_sync(digest_of(b"never stored")) is None


async def test_a_withdrawn_digest_is_absent_at_once_and_removed_in_a_thread(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = await store.put(b"evict me")
    store.withdraw(digest)
    assert await store.size(digest) is None  # a request that looks it up now gets a miss
    assert await store.read(digest) is None
    assert store.path(digest).exists()  # the file itself goes in remove_withdrawn
    assert await store.remove_withdrawn([digest]) == [digest]
    assert not store.path(digest).exists()


async def test_a_publish_after_withdraw_cancels_the_removal(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = await store.put(b"fetched again")
    store.withdraw(digest)
    await store.put(b"fetched again", digest)  # a request saw the miss and fetched it again
    assert await store.remove_withdrawn([digest]) == []
    assert await store.read(digest) == b"fetched again"


async def test_only_withdrawn_digests_are_removed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = await store.put(b"kept")
    assert await store.remove_withdrawn([digest]) == []
    assert await store.size(digest) == len(b"kept")


def place(store: BlobStore, relative: str, data: bytes = b"x") -> None:
    path = store.root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("relative", "stored_under_digest"),
    [
        pytest.param("sha256/{p}/{h}", True, id="sha256/<prefix>/<hex> -> a stored digest"),
        pytest.param("sha256/00/{h}", False, id="file under the wrong prefix -> stray"),
        pytest.param("sha256/{p}/notahexdigest", False, id="name that is not a digest -> stray"),
        pytest.param("sha256/{p}/{h}.partial", False, id="digest with a suffix -> stray"),
        pytest.param("md5/{p}/{h}", False, id="unknown algorithm -> stray"),
    ],
)
async def test_walk_names_each_file_by_digest_or_as_stray(
    tmp_path: Path, relative: str, stored_under_digest: bool
) -> None:
    store = BlobStore(tmp_path)
    hexdigest = hashlib.sha256(b"x").hexdigest()
    if relative.startswith("sha256/00/"):
        hexdigest = "ff" + hexdigest[2:]
    location = relative.format(p=hexdigest[:2], h=hexdigest)
    place(store, location)
    (found,) = list(store.walk_sync())
    assert found.location == location
    assert found.key == (f"sha256:{hexdigest}" if stored_under_digest else "")
    assert found.size == 1
    assert found.mtime == pytest.approx(os.stat(store.root / location).st_mtime)


async def test_walk_reports_files_where_directories_belong_without_a_size(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    (store.root / "README").write_text("not a blob")
    (store.root / "sha256").mkdir()
    (store.root / "sha256" / "ab").write_text("not a prefix dir")
    found = sorted(store.walk_sync(), key=lambda f: f.location)
    assert [(f.key, f.location, f.size) for f in found] == [("", "README", None), ("", "sha256/ab", None)]


async def test_intact_rehashes_the_stored_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = await store.put(b"content")
    assert store.intact_sync(digest) is True
    store.path(digest).write_bytes(b"bit rot")
    assert store.intact_sync(digest) is False
    store.path(digest).unlink()
    assert store.intact_sync(digest) is None


def test_quarantine_moves_the_file_out_of_the_store(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = digest_of(b"damaged")
    place(store, f"sha256/{digest.hex[:2]}/{digest.hex}", b"damaged")
    (found,) = list(store.walk_sync())
    target = Path(store.quarantine_sync(found.location, found.key))
    assert store.size_sync(digest) is None
    assert target.parent == tmp_path / "quarantine"
    assert target.name.startswith(f"sha256-{digest.hex}.")
    assert target.read_bytes() == b"damaged"


async def test_sweep_removes_only_old_temp_files_unless_told_all(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    old, young = store.tmp_dir / "fetch-old", store.tmp_dir / "fetch-young"
    old.write_bytes(b"old")
    young.write_bytes(b"young")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert store.sweep_tmp_sync(600, dry_run=True) == 1
    assert old.exists()
    assert store.sweep_tmp_sync(600) == 1
    assert not old.exists() and young.exists()
    assert store.sweep_tmp_sync(0) == 1
    assert list(store.tmp_dir.iterdir()) == []


# --- the housekeeper's eviction through the store ------------------------------------------------------------
Setup = tuple[BlobStore, Usage, Callable[..., Housekeeper]]


@pytest.fixture
async def housekeeping(tmp_path: Path) -> AsyncIterator[Setup]:
    store, index, usage = BlobStore(tmp_path), Index(tmp_path), Usage(tmp_path)
    started: list[Housekeeper] = []

    def make(busy: Callable[[str], bool] = lambda key: False) -> Housekeeper:
        housekeeper = Housekeeper(store, index, usage, Limits(size=10_000), busy=busy)
        started.append(housekeeper)
        return housekeeper

    yield store, usage, make
    for housekeeper in started:
        await housekeeper.close()
    index.close()
    usage.close()


async def stored(store: BlobStore, usage: Usage, *contents: bytes) -> list[Digest]:
    digests = []
    for data in contents:
        digest = await store.put(data)
        await usage.added(digest, len(data), "blob")
        digests.append(digest)
    return digests


async def test_eviction_removes_files_through_the_store(housekeeping: Setup) -> None:
    store, usage, make = housekeeping
    first, second = await stored(store, usage, b"a" * 100, b"b" * 100)
    housekeeper = make()
    await housekeeper.start()
    report = await housekeeper.evict(target=0)
    assert [r.digest for r in report.removed] == [str(first), str(second)]  # least recently served first
    assert await store.size(first) is None and await store.size(second) is None
    assert usage.total == 0


async def test_eviction_skips_a_leased_digest(housekeeping: Setup) -> None:
    store, usage, make = housekeeping
    leased, free = await stored(store, usage, b"a" * 100, b"b" * 100)
    housekeeper = make(busy=usage.busy)
    await housekeeper.start()
    release = usage.hold(leased)
    report = await housekeeper.evict(target=0)
    release()
    assert [r.digest for r in report.removed] == [str(free)]
    assert await store.read(leased) == b"a" * 100


async def test_a_digest_fetched_again_during_eviction_keeps_its_file_and_entry(
    housekeeping: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, usage, make = housekeeping
    (digest,) = await stored(store, usage, b"c" * 100)
    remove = store.remove_withdrawn

    async def fetched_meanwhile(digests: Iterable[Digest]) -> list[Digest]:
        await store.put(b"c" * 100, digest)  # a request saw the miss and published it again
        return await remove(digests)

    monkeypatch.setattr(store, "remove_withdrawn", fetched_meanwhile)
    housekeeper = make()
    await housekeeper.start()
    report = await housekeeper.evict(target=0)
    assert report.removed == []
    assert await store.read(digest) == b"c" * 100
    assert str(digest) in usage.table
