"""What pulls return: Accept wildcards cold and cached, a narrow Accept never erasing a tag, pulled-through names
refusing pushes, and ranges read during a cold fill never completed with unverified bytes.

The upstream is the fake registry, which answers like Distribution where it matters here (an OCI manifest only for
an Accept naming its type) and can corrupt blobs, which no real upstream can be made to do.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from mirror.oci.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from tests.conftest import MirrorClient, MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.support.plain_http import sha256
from tests.support.pushing import error_code, push_image

Fake = tuple[FakeRegistry, TestServer]
FULL_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))


@pytest.mark.parametrize(
    ("method", "accept"),
    [
        pytest.param("GET", "*/*", id="GET Accept */* -> 200 cold and cached"),
        pytest.param("HEAD", "*/*", id="HEAD Accept */* -> 200 cold and cached"),
        pytest.param("GET", "application/*", id="GET Accept application/* -> 200 cold and cached"),
        pytest.param("GET", f"{DOCKER_MANIFEST}, */*", id="GET Docker type + */* -> OCI manifest, cold and cached"),
    ],
)
async def test_wildcard_accept_takes_every_type(
    fake_upstream: Fake, make_mirror: MirrorFactory, method: str, accept: str
) -> None:
    fake, server = fake_upstream
    digest = fake.add_image("test/wild", "v1", [b"layer"])
    client = await make_mirror(str(server.make_url("")), timeout=2.0)
    for state in ("cold", "cached"):
        resp = await client.request(method, "/v2/test/wild/manifests/v1", headers={"Accept": accept})
        assert resp.status == 200, (state, await resp.text())
        assert resp.headers["Docker-Content-Digest"] == digest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
    assert "*/*" not in fake.accepts[0] and OCI_MANIFEST in fake.accepts[0]


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_narrow_accept_never_erases_a_cached_tag(
    fake_upstream: Fake, make_mirror: MirrorFactory, method: str
) -> None:
    """A Docker-only Accept for a cached OCI tag: the upstream answers 404 (the type is not acceptable), the
    client gets that 404, and the tag stays cached: served stale when the upstream is down, still listed."""
    fake, server = fake_upstream
    digest = fake.add_image("test/img", "v1", [b"layer"])
    client = await make_mirror(str(server.make_url("")), timeout=2.0, tag_ttl=0)
    path = "/v2/test/img/manifests/v1"
    assert (await client.get(path, headers={"Accept": FULL_ACCEPT})).status == 200
    resp = await client.request(method, path, headers={"Accept": DOCKER_MANIFEST})
    assert resp.status == 404
    if method == "GET":
        assert await error_code(resp) == "MANIFEST_UNKNOWN"
    assert fake.accepts[-1] == DOCKER_MANIFEST, "the client's own Accept is what the upstream was asked"
    fake.faults.down = True
    resp = await client.get(path, headers={"Accept": FULL_ACCEPT})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["X-Mirror-Stale"] == "true"
    assert (await (await client.get("/v2/test/img/tags/list")).json())["tags"] == ["v1"]


async def test_tag_deleted_upstream_is_forgotten(fake_upstream: Fake, make_mirror: MirrorFactory) -> None:
    """A 404 to a full Accept does mean the tag is gone: the record goes, nothing stale is served for it."""
    fake, server = fake_upstream
    fake.add_image("test/gone", "v1", [b"layer"])
    client = await make_mirror(str(server.make_url("")), timeout=2.0, tag_ttl=0)
    path = "/v2/test/gone/manifests/v1"
    assert (await client.get(path)).status == 200
    del fake.manifests[("test/gone", "v1")]
    assert (await client.head(path, headers={"Accept": FULL_ACCEPT})).status == 404
    fake.faults.down = True
    resp = await client.get(path)
    assert resp.status == 503, await resp.text()


@pytest.mark.parametrize(
    "pull",
    [
        pytest.param("manifest", id="manifest pulled by digest only -> push refused 403 DENIED"),
        pytest.param("blob", id="blob pulled by digest only -> push refused 403 DENIED"),
    ],
)
async def test_a_name_pulled_by_digest_refuses_pushes(
    push_mirror: MirrorFactory, fake_upstream: Fake, pull: str
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_image("test/img3", None, [b"upstream layer"])
    target = digest if pull == "manifest" else sha256(b"upstream layer")
    client = await push_mirror()
    path = f"/v2/test/img3/{'manifests' if pull == 'manifest' else 'blobs'}/{target}"
    assert (await client.get(path)).status == 200
    for resp in (
        await client.post("/v2/test/img3/blobs/uploads/"),
        await client.put("/v2/test/img3/manifests/v1", data=b"{}", headers={"Content-Type": OCI_MANIFEST}),
    ):
        assert resp.status == 403, await resp.text()
        body = await resp.json()
        assert body["errors"][0]["code"] == "DENIED"
        assert "pulled through" in body["errors"][0]["message"]
    resp = await client.get(path)
    assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == target
    assert (await client.post("/v2/test/other/blobs/uploads/")).status == 202, "names never pulled stay pushable"


async def test_pulled_by_digest_survives_a_restart_and_yields_to_push_prefixes(
    push_mirror: MirrorFactory, fake_upstream: Fake, tmp_path: Path
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_image("test/img3", None, [b"upstream layer"])
    data_dir = tmp_path / "data"
    client = await push_mirror(data_dir=data_dir)
    assert (await client.get(f"/v2/test/img3/manifests/{digest}")).status == 200
    await client.close()
    restarted = await push_mirror(data_dir=data_dir)
    assert (await restarted.post("/v2/test/img3/blobs/uploads/")).status == 403
    await restarted.close()
    explicit = await push_mirror(data_dir=data_dir, push_prefixes=("test/",))
    await push_image(explicit, "test/img3", "v1", [b"ours"])


async def _read_range(client: MirrorClient, path: str, last: int) -> tuple[int, bytes, bool]:
    """Status, body received, and whether the body came complete (no cut)."""
    resp = await client.get(path, headers={"Range": f"bytes=0-{last}"})
    parts: list[bytes] = []
    try:
        async for chunk in resp.content.iter_any():
            parts.append(chunk)
    except aiohttp.ClientPayloadError:
        return resp.status, b"".join(parts), False
    return resp.status, b"".join(parts), True


async def test_range_short_of_the_end_during_a_fill_of_corrupt_bytes_is_never_completed(
    fake_upstream: Fake, make_mirror: MirrorFactory
) -> None:
    """``Range: bytes=0-(size-2)`` while the blob arrives from an upstream that corrupts it: the client gets a
    cut connection, never a complete 206 of wrong bytes."""
    fake, server = fake_upstream
    data = os.urandom(300_000)
    digest = fake.add_blob(data)
    fake.faults.corrupt_blobs = True
    fake.faults.drip = 16_384
    client = await make_mirror(str(server.make_url("")), timeout=2.0)
    status, body, complete = await _read_range(client, f"/v2/test/blob/blobs/{digest}", len(data) - 2)
    assert status == 206
    assert not complete and len(body) < len(data) - 1, "a complete 206 of unverified (here: wrong) bytes"
    assert fake.count("GET", "blobs") == 1


async def test_ranges_during_a_fill_of_good_bytes_are_right(fake_upstream: Fake, make_mirror: MirrorFactory) -> None:
    """With a correct upstream the same ranged clients (one at the blob's end, one short of it, one whole GET)
    get the right bytes, all from one upstream fetch."""
    fake, server = fake_upstream
    data = os.urandom(300_000)
    digest = fake.add_blob(data)
    fake.faults.drip = 16_384
    client = await make_mirror(str(server.make_url("")), timeout=2.0)
    path = f"/v2/test/blob/blobs/{digest}"
    results = await asyncio.gather(*(_read_range(client, path, last) for last in (len(data) - 2, 999, len(data) - 1)))
    assert results[0] == (206, data[:-1], True)
    assert results[1] == (206, data[:1000], True)
    assert results[2] == (206, data, True)
    assert fake.count("GET", "blobs") == 1
