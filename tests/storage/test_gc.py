"""Start-up reconciliation, gc (unreferenced content, temp sweeps, dangling tags) and verify, in process.

Real pulls from a Distribution registry and the CLI against a running server are in
``tests/integration/test_operating.py``; here the fake upstream lets the tests count refetches exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from mirror.api.admin import ADMIN
from mirror.api.keys import USAGE
from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from mirror.oci.reference import Digest
from mirror.storage.index import Index
from tests.conftest import MirrorClient, MirrorFactory, fetches_done
from tests.fakes.registry import FakeRegistry, sha256
from tests.support.ops import blob_files

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Upstream = tuple[FakeRegistry, TestServer]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    fake = FakeRegistry()
    server = TestServer(fake.app())
    await server.start_server()
    yield fake, server
    await server.close()


@pytest.fixture
def start(aiohttp_client: AiohttpClient, tmp_path: Path, upstream: Upstream) -> MirrorFactory:
    _, server = upstream

    async def start(**cache: Any) -> MirrorClient:
        config = Config(
            data_dir=tmp_path / "data",
            upstreams=(UpstreamConfig(registry="docker.io", url=str(server.make_url("")), default=True),),
            extra={"cache": {"gc_grace": 0, "tmp_max_age": 60, **cache}},
        )
        return await aiohttp_client(create_app(config))

    return start


async def pull(client: MirrorClient, repo: str, layers: list[bytes]) -> None:
    resp = await client.get(f"/v2/{repo}/manifests/latest", headers={"Accept": MANIFEST})
    assert resp.status == 200
    for layer in layers:
        resp = await client.get(f"/v2/{repo}/blobs/{sha256(layer)}")
        assert await resp.read() == layer
    await fetches_done(client)


async def test_startup_rebuilds_a_lost_index_and_drops_stale_records(
    start: MirrorFactory, upstream: Upstream, tmp_path: Path
) -> None:
    fake, _ = upstream
    layers = [os.urandom(5000), os.urandom(7000)]
    fake.add_image("library/a", "latest", layers)
    client = await start()
    await pull(client, "library/a", layers)
    before = {k: e.size for k, e in client.app[USAGE].table.items()}
    await client.close()
    data = tmp_path / "data"
    # Lose the usage table, remove one blob behind the mirror's back, and drop a stray file into blobs/.
    for path in (data / "usage").iterdir():
        path.unlink()
    (data / "blobs" / "sha256" / sha256(layers[0])[7:9] / sha256(layers[0])[7:]).unlink()
    (data / "blobs" / "sha256" / "zz").mkdir()
    (data / "blobs" / "sha256" / "zz" / "not-a-digest").write_bytes(b"junk")
    (data / "tmp" / "fetch-interrupted").write_bytes(b"partial")

    client = await start()
    table = client.app[USAGE].table
    assert {k: e.size for k, e in table.items()} == {k: v for k, v in before.items() if k != sha256(layers[0])}
    assert blob_files(data) == {k: e.size for k, e in table.items()}
    assert list((data / "tmp").iterdir()) == []
    assert len(list((data / "quarantine").iterdir())) == 1
    gets = fake.count("GET", "blobs")
    await pull(client, "library/a", layers)  # the lost blob comes back from the upstream
    assert fake.count("GET", "blobs") == gets + 1


async def test_gc_removes_unreferenced_blobs_old_temp_files_and_dangling_tags(
    start: MirrorFactory, upstream: Upstream, tmp_path: Path
) -> None:
    fake, _ = upstream
    kept, dropped = [os.urandom(3000)], [os.urandom(4000), os.urandom(6000)]
    fake.add_image("library/kept", "latest", kept)
    dropped_manifest = fake.add_image("library/dropped", "latest", dropped)
    client = await start()
    await pull(client, "library/kept", kept)
    await pull(client, "library/dropped", dropped)
    admin = client.app[ADMIN]
    # Evict only the manifest of library/dropped (as eviction would, being least recently served).
    await admin.housekeeper.flush()
    usage = client.app[USAGE]
    for key in list(usage.table):
        if key != dropped_manifest:
            usage.touch(Digest.parse(key))
    report = await admin.housekeeper.evict(target=usage.total - 1)
    assert [r.digest for r in report.removed] == [dropped_manifest]
    tmp = tmp_path / "data" / "tmp"
    (tmp / "fetch-old").write_bytes(b"x")
    os.utime(tmp / "fetch-old", (time.time() - 3600, time.time() - 3600))
    (tmp / "fetch-young").write_bytes(b"y")

    dry = await admin.gc(dry_run=True)
    assert {r["digest"] for r in dry["removed"]} == {sha256(b) for b in dropped}
    assert dry["removed_bytes"] == 10000 and dry["temp_files"] == 1 and dry["tags_dropped"] == 1
    assert sha256(dropped[0]) in blob_files(tmp_path / "data")  # a dry run changes nothing

    done = await admin.gc()
    assert done["removed_bytes"] == 10000
    files = blob_files(tmp_path / "data")
    assert sha256(dropped[0]) not in files and sha256(kept[0]) in files
    assert sorted(p.name for p in tmp.iterdir()) == ["fetch-young"]
    assert set(usage.table) == set(files)
    await pull(client, "library/dropped", dropped)  # fetched again transparently


async def test_verify_quarantines_a_corrupted_blob_and_it_is_fetched_again(
    start: MirrorFactory, upstream: Upstream, tmp_path: Path
) -> None:
    fake, _ = upstream
    layers = [os.urandom(20000), os.urandom(1000)]
    fake.add_image("library/v", "latest", layers)
    client = await start()
    await pull(client, "library/v", layers)
    victim = tmp_path / "data" / "blobs" / "sha256" / sha256(layers[0])[7:9] / sha256(layers[0])[7:]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    seen: list[tuple[int, int]] = []
    report = await client.app[ADMIN].verify(lambda done, total, what: seen.append((done, total)))
    assert [r["digest"] for r in report["removed"]] == [sha256(layers[0])]
    assert report["checked"] == 3  # the manifest and two layers (the config was never pulled)
    assert seen[-1][0] == seen[-1][1] > 20000
    assert not victim.exists()
    assert len(list((tmp_path / "data" / "quarantine").iterdir())) == 1
    gets = fake.count("GET", "blobs")
    await pull(client, "library/v", layers[:1])
    assert fake.count("GET", "blobs") == gets + 1


async def test_pushed_content_is_neither_evicted_nor_collected(
    start: MirrorFactory, upstream: Upstream, tmp_path: Path
) -> None:
    fake, _ = upstream
    layers = [os.urandom(4000)]
    manifest = fake.add_image("library/p", "latest", layers)
    client = await start()
    await pull(client, "library/p", layers)
    admin = client.app[ADMIN]
    index = admin.index
    assert isinstance(index, Index)  # the disk index, whose link/unlink the push service calls
    for digest in (manifest, sha256(layers[0])):
        await index.link("team/app", Digest.parse(digest))
    report = await admin.housekeeper.evict(target=0)
    assert report.removed == [] and set(blob_files(tmp_path / "data")) >= {manifest, sha256(layers[0])}
    await admin.index.delete_manifest(Digest.parse(manifest))  # unreferenced now, but still pushed
    assert (await admin.gc())["removed"] == []
    await index.unlink("team/app", Digest.parse(sha256(layers[0])))  # unlinked: collectable again
    assert [r["digest"] for r in (await admin.gc())["removed"]] == [sha256(layers[0])]
