"""Pushed and pulled-through content side by side: which names accept pushes, local repositories answering for
their names without asking the upstream, and upload sessions and local repositories surviving a restart."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from mirror.api.keys import LOCAL
from mirror.oci.reference import Digest
from tests.conftest import MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.support.plain_http import OCI_MANIFEST, sha256
from tests.support.pushing import error_code, push_blob, push_image

Fake = tuple[FakeRegistry, TestServer]


async def test_a_pushed_name_is_answered_locally_only(push_mirror: MirrorFactory, fake_upstream: Fake) -> None:
    """Once pushed, a name is a local repository: its tags are the pushed ones, and the upstream, which has an
    unrelated ``my/app``, is not asked any more."""
    fake, _ = fake_upstream
    fake.add_image("my/app", "only-upstream", [b"other layer"])
    client = await push_mirror()
    before = len(fake.requests)
    pushed = await push_image(client, "my/app", "2.0", [b"pushed layer"])
    resp = await client.get("/v2/my/app/manifests/2.0")
    assert await resp.read() == pushed
    resp = await client.get("/v2/my/app/manifests/only-upstream")
    assert resp.status == 404
    assert await error_code(resp) == "MANIFEST_UNKNOWN"
    resp = await client.get("/v2/my/app/tags/list")
    assert (await resp.json())["tags"] == ["2.0"]
    assert len(fake.requests) == before


async def test_ns_and_host_prefix_always_mean_the_upstream(push_mirror: MirrorFactory, fake_upstream: Fake) -> None:
    """containerd (``?ns=``) and podman (``/v2/docker.io/...``) mirror clients never see pushed content."""
    fake, _ = fake_upstream
    upstream_digest = fake.add_image("my/app", "1.0", [b"upstream layer"])
    client = await push_mirror()
    await push_image(client, "my/app", "1.0", [b"pushed layer"])
    for path in ("/v2/my/app/manifests/1.0?ns=docker.io", "/v2/docker.io/my/app/manifests/1.0"):
        resp = await client.get(path, headers={"Accept": OCI_MANIFEST})
        assert resp.headers["Docker-Content-Digest"] == upstream_digest, path
    resp = await client.get("/v2/my/app/manifests/1.0")
    assert resp.headers["Docker-Content-Digest"] != upstream_digest


async def test_a_name_already_pulled_through_is_not_shadowed(push_mirror: MirrorFactory, fake_upstream: Fake) -> None:
    fake, _ = fake_upstream
    fake.add_image("team/tool", "1.0", [b"upstream layer"])
    client = await push_mirror()
    assert (await client.get("/v2/team/tool/manifests/1.0", headers={"Accept": OCI_MANIFEST})).status == 200
    resp = await client.post("/v2/team/tool/blobs/uploads/")
    assert resp.status == 403
    body = await resp.json()
    assert body["errors"][0]["code"] == "DENIED"
    assert "push_prefixes" in body["errors"][0]["message"]


@pytest.mark.parametrize(
    ("prefixes", "name", "status"),
    [
        pytest.param((), "my/app", 202, id="default: a new name -> accepted"),
        pytest.param((), "myapp", 202, id="default: a one-component name -> accepted"),
        pytest.param((), "library/nginx", 403, id="default: library/ -> 403 DENIED"),
        pytest.param((), "library", 403, id="default: library itself -> 403 DENIED"),
        pytest.param((), "localhost:5000/app", 400, id="default: host:port component -> 400 NAME_INVALID"),
        pytest.param((), "ghcr.io/org/app", 403, id="default: a registry host prefix -> 403 DENIED"),
        pytest.param(("team/",), "team/app", 202, id="prefix team/: team/app -> accepted"),
        pytest.param(("team/",), "team", 202, id="prefix team/: team -> accepted"),
        pytest.param(("team/",), "teamster/app", 403, id="prefix team/: teamster/app -> 403 DENIED"),
        pytest.param(("team/",), "my/app", 403, id="prefix team/: my/app -> 403 DENIED"),
        pytest.param(("library/",), "library/nginx", 202, id="prefix library/: the operator allows it"),
        pytest.param(("*",), "anything/at/all", 202, id="prefix * -> every name"),
    ],
)
async def test_push_rule(push_mirror: MirrorFactory, prefixes: tuple[str, ...], name: str, status: int) -> None:
    client = await push_mirror(push_prefixes=prefixes)
    resp = await client.post(f"/v2/{name}/blobs/uploads/")
    assert resp.status == status, await resp.text()


async def test_explicit_prefix_may_shadow_a_pulled_through_name(
    push_mirror: MirrorFactory, fake_upstream: Fake
) -> None:
    fake, _ = fake_upstream
    fake.add_image("team/tool", "1.0", [b"upstream layer"])
    client = await push_mirror(push_prefixes=("team/",))
    assert (await client.get("/v2/team/tool/manifests/1.0", headers={"Accept": OCI_MANIFEST})).status == 200
    manifest = await push_image(client, "team/tool", "1.0", [b"ours"])
    resp = await client.get("/v2/team/tool/manifests/1.0")
    assert await resp.read() == manifest


async def test_head_blob_before_the_first_push_does_not_ask_the_upstream(
    push_mirror: MirrorFactory, fake_upstream: Fake
) -> None:
    """Docker HEADs every layer before pushing it; the upstream (Docker Hub answers 401 for unknown
    repositories) is not asked."""
    fake, _ = fake_upstream
    client = await push_mirror()
    resp = await client.head(f"/v2/new/app/blobs/{sha256(b'x')}")
    assert resp.status == 404
    assert fake.count("HEAD", "blobs") == 0


async def test_pushed_content_is_marked_as_never_evicted(push_mirror: MirrorFactory) -> None:
    client = await push_mirror()
    manifest = await push_image(client, "my/app", "1.0", [b"layer"])
    index = client.app[LOCAL]._index  # the Index the eviction (mirror gc) consults
    for digest in (sha256(b"layer"), sha256(manifest)):
        assert index.is_pushed_sync(Digest.parse(digest))
    assert not index.is_pushed_sync(Digest.parse(sha256(b"unrelated")))


# --- restarts ---------------------------------------------------------------------------------------------------
async def test_upload_session_resumes_after_a_restart(push_mirror: MirrorFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data = os.urandom(200_000)
    client = await push_mirror(data_dir=data_dir)
    resp = await client.post("/v2/my/app/blobs/uploads/")
    location = resp.headers["Location"]
    resp = await client.patch(location, data=data[:120_000], headers={"Content-Range": "0-119999"})
    assert resp.status == 202
    await client.close()

    # A chunk that was half-written when the mirror died: bytes in the file that were never acknowledged.
    uuid = location.rsplit("/", 1)[1]
    await asyncio.to_thread(_append, data_dir / "uploads" / uuid / "data", b"half a chunk")

    client = await push_mirror(data_dir=data_dir)
    resp = await client.get(location)
    assert resp.status == 204
    assert resp.headers["Range"] == "0-119999"
    resp = await client.patch(location, data=data[120_000:], headers={"Content-Range": f"120000-{len(data) - 1}"})
    assert resp.status == 202, await resp.text()
    resp = await client.put(f"{location}?digest={sha256(data)}")
    assert resp.status == 201, await resp.text()
    assert await (await client.get(f"/v2/my/app/blobs/{sha256(data)}")).read() == data


async def test_local_repositories_survive_a_restart(
    push_mirror: MirrorFactory, fake_upstream: Fake, tmp_path: Path
) -> None:
    fake, _ = fake_upstream
    fake.add_image("my/app", "upstream-only", [b"upstream layer"])
    data_dir = tmp_path / "data"
    client = await push_mirror(data_dir=data_dir)
    manifest = await push_image(client, "my/app", "1.0", [b"layer"])
    await client.close()
    client = await push_mirror(data_dir=data_dir)
    assert await (await client.get("/v2/my/app/manifests/1.0")).read() == manifest
    assert (await client.get("/v2/my/app/manifests/upstream-only")).status == 404
    assert (await (await client.get("/v2/_catalog")).json())["repositories"] == ["my/app"]


async def test_abandoned_sessions_are_removed(push_mirror: MirrorFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    client = await push_mirror(data_dir=data_dir, upload_max_age=3600)
    old = (await client.post("/v2/my/app/blobs/uploads/")).headers["Location"]
    fresh = (await client.post("/v2/my/app/blobs/uploads/")).headers["Location"]
    await client.close()
    long_ago = time.time() - 7200
    os.utime(data_dir / "uploads" / old.rsplit("/", 1)[1] / "session.json", (long_ago, long_ago))
    (data_dir / "uploads" / "stray-file").write_text("not a session")

    client = await push_mirror(data_dir=data_dir, upload_max_age=3600)  # start-up sweeps
    assert (await client.get(old)).status == 404
    assert (await client.get(fresh)).status == 204
    assert sorted(p.name for p in (data_dir / "uploads").iterdir()) == [fresh.rsplit("/", 1)[1]]


async def test_sweep_spares_a_session_receiving_a_chunk(push_mirror: MirrorFactory, tmp_path: Path) -> None:
    client = await push_mirror()
    uploads: Any = client.app[LOCAL].uploads
    location = (await client.post("/v2/my/app/blobs/uploads/")).headers["Location"]
    uuid = location.rsplit("/", 1)[1]
    async with uploads.sessions.lock(uuid):
        assert await uploads.sessions.sweep(0, now=time.time() + 10) == []
    assert await uploads.sessions.sweep(0, now=time.time() + 10) == [uuid]


async def test_sweep_spares_a_session_being_created_and_ages_a_leftover_by_its_directory(
    push_mirror: MirrorFactory,
) -> None:
    client = await push_mirror()
    sessions: Any = client.app[LOCAL].uploads.sessions
    # Another worker's session between its directory and its record (a worker starting up sweeps meanwhile).
    creating = sessions.root / "0b6a2c1e-8d4f-4e2a-9c3b-5d6e7f8a9b0c"
    creating.mkdir()
    assert await sessions.sweep(86400) == []
    assert creating.is_dir()
    long_ago = time.time() - 2 * 86400
    os.utime(creating, (long_ago, long_ago))  # a crash left it there two days ago
    assert await sessions.sweep(86400) == [creating.name]
    assert not creating.exists()


async def test_monolithic_blob_in_one_repo_is_mountable_in_another(push_mirror: MirrorFactory) -> None:
    client = await push_mirror()
    digest = await push_blob(client, "a/one", b"shared")
    resp = await client.post(f"/v2/b/two/blobs/uploads/?mount={digest}&from=a/one")
    assert resp.status == 201
    assert await (await client.get(f"/v2/b/two/blobs/{digest}")).read() == b"shared"


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)
