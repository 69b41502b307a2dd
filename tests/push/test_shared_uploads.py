"""Push upload sessions across processes sharing one data dir: a chunked push whose requests land on different
processes works, requests on one session are applied one at a time across processes, and the session caps count
the sessions of every process. Two real mirrors (``COORDINATED``) on one data dir; raw HTTP for the chunk
protocol, and a real ``skopeo copy`` push to one process pulled back from the other.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.clients import skopeo
from tests.support.ops import COORDINATED, NO_UPSTREAM, Mirror, eventually
from tests.support.pushing import get_json, oci_layout

REPO = "my/app"


def two_mirrors(data: Path, *flags: str) -> tuple[Mirror, Mirror]:
    first = Mirror(data, NO_UPSTREAM, *flags, entry=COORDINATED)
    try:
        return first, Mirror(data, NO_UPSTREAM, *flags, entry=COORDINATED)
    except BaseException:
        first.stop()
        raise


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Mirror, Mirror]]:
    a, b = two_mirrors(tmp_path / "data", "--upload-max-sessions", "2")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start(http: aiohttp.ClientSession, mirror: Mirror) -> tuple[int, str]:
    async with http.post(f"{mirror.url}/v2/{REPO}/blobs/uploads/") as resp:
        return resp.status, resp.headers.get("Location", "")


async def patch(
    http: aiohttp.ClientSession,
    mirror: Mirror,
    location: str,
    data: bytes | AsyncIterator[bytes],
    offset: int,
    size: int,
) -> tuple[int, str]:
    headers = {"Content-Range": f"{offset}-{offset + size - 1}", "Content-Length": str(size)}
    async with http.patch(mirror.url + location, data=data, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Range", "")


def knows(mirror: Mirror) -> bool:
    """``mirror`` knows that REPO is local (at once, whichever process made it local)."""
    return REPO in get_json(f"{mirror.url}/v2/_catalog")["repositories"]


async def blob_of(http: aiohttp.ClientSession, mirror: Mirror, digest: str) -> bytes:
    async with http.get(f"{mirror.url}/v2/{REPO}/blobs/{digest}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_a_chunked_push_alternating_processes_on_every_request(
    two: tuple[Mirror, Mirror], http: aiohttp.ClientSession
) -> None:
    a, b = two
    data = os.urandom(3 * 2**20 + 5)
    chunks = [data[i : i + 2**20] for i in range(0, len(data), 2**20)]  # four chunks: B, A, B, A
    status, location = await start(http, a)
    assert status == 202
    offset = 0
    for n, chunk in enumerate(chunks):
        status, held = await patch(http, (b, a)[n % 2], location, chunk, offset, len(chunk))
        offset += len(chunk)
        assert (status, held) == (202, f"0-{offset - 1}"), f"chunk {n}"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with http.put(f"{b.url}{location}?digest={digest}") as resp:  # the last writer was A
        assert resp.status == 201, await resp.text()
    assert knows(a), "A knows the repository B made local"
    assert await blob_of(http, a, digest) == data
    assert await blob_of(http, b, digest) == data


async def test_one_request_at_a_time_on_a_session_across_processes(
    two: tuple[Mirror, Mirror], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The same first chunk sent to both processes at once: one is applied, the other answered 416 (it no longer
    continues the upload), and the upload completes with the right digest."""
    a, b = two
    chunk = os.urandom(2**20)
    status, location = await start(http, a)
    assert status == 202
    go = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield chunk[:1000]
        await go.wait()  # A is in the middle of the chunk, holding the session
        yield chunk[1000:]

    first = asyncio.ensure_future(patch(http, a, location, stalled(), 0, len(chunk)))
    data_file = tmp_path / "data" / "uploads" / location.rpartition("/")[2] / "data"
    await eventually(lambda: data_file.stat().st_size >= 1000, what="A receiving the chunk")
    second = asyncio.ensure_future(patch(http, b, location, chunk, 0, len(chunk)))
    done, _ = await asyncio.wait({second}, timeout=3)
    assert not done, "B applied a chunk while A was receiving one on the same session"
    go.set()
    assert await first == (202, f"0-{len(chunk) - 1}")
    assert (await second)[0] == 416
    digest = "sha256:" + hashlib.sha256(chunk).hexdigest()
    async with http.put(f"{b.url}{location}?digest={digest}") as resp:
        assert resp.status == 201, await resp.text()
    assert await blob_of(http, b, digest) == chunk


async def test_the_session_cap_counts_the_sessions_of_every_process(
    two: tuple[Mirror, Mirror], http: aiohttp.ClientSession
) -> None:
    a, b = two  # --upload-max-sessions 2
    assert (await start(http, a))[0] == 202
    status, location = await start(http, b)
    assert status == 202
    assert (await start(http, a))[0] == 429
    assert (await start(http, b))[0] == 429
    async with http.delete(a.url + location) as resp:  # B's session, cancelled through A
        assert resp.status == 204
    assert (await start(http, a))[0] == 202


@pytest.mark.integration
def test_skopeo_pushes_to_one_process_and_pulls_from_the_other(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    oci_layout(layout, "1.0")
    a, b = two_mirrors(tmp_path / "data")
    try:
        host_a, host_b = a.url.removeprefix("http://"), b.url.removeprefix("http://")
        skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:1.0", f"docker://{host_a}/{REPO}:1.0")
        assert knows(b), "B knows the repository A made local"
        back = tmp_path / "back"
        skopeo("copy", "--src-tls-verify=false", f"docker://{host_b}/{REPO}:1.0", f"dir:{back}")
        manifest = json.loads((back / "manifest.json").read_text())
        for desc in [manifest["config"], *manifest["layers"]]:
            hex_digest = desc["digest"].split(":", 1)[1]
            assert hashlib.sha256((back / hex_digest).read_bytes()).hexdigest() == hex_digest
    finally:
        a.stop()
        b.stop()
