"""The real ``mirror`` process killed with SIGKILL in the middle of an upload: after a restart the session resumes
from what the client was last told, and a blob whose PUT was cut is not visible, nor is anything half-written."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.ops import NO_UPSTREAM, Mirror, free_port
from tests.support.plain_http import sha256

CHUNK = 1 << 20
DATA = os.urandom(3 * CHUNK)


def start(data_dir: Path, port: int) -> Mirror:
    """The mirror on ``port`` (the same one after a restart: clients keep their upload URLs)."""
    return Mirror(data_dir, NO_UPSTREAM, listen=f"127.0.0.1:{port}")


async def body_then_hang(first: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """A request body that sends ``first`` and then stalls until ``release`` (never, in these tests)."""
    yield first
    await release.wait()
    yield b"never sent"


async def poll(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds: the mirror is another process, so its files are polled, with a deadline."""
    async with asyncio.timeout(30):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


async def wait_for_file_size(path: Path, size: int) -> None:
    await poll(lambda: path.exists() and path.stat().st_size >= size)


async def kill_mid_request(
    mirror: Mirror, session: aiohttp.ClientSession, method: str, url: str, watch: Path, size: int
) -> None:
    """Send a body that stalls half-way, wait until the mirror has written ``size`` bytes to ``watch``, SIGKILL."""
    release = asyncio.Event()
    request = asyncio.create_task(session.request(method, url, data=body_then_hang(DATA[CHUNK : 2 * CHUNK], release)))
    await wait_for_file_size(watch, size)
    mirror.kill9()
    with pytest.raises(aiohttp.ClientError):
        await request


@pytest.mark.parametrize("method", ["PATCH", "PUT"], ids=["killed during a PATCH", "killed during the final PUT"])
async def test_kill_during_upload_then_resume(tmp_path: Path, method: str) -> None:
    data_dir, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        with start(data_dir, port) as mirror:
            async with session.post(f"{base}/v2/my/app/blobs/uploads/") as resp:
                location = resp.headers["Location"]
            async with session.patch(
                f"{base}{location}", data=DATA[:CHUNK], headers={"Content-Range": f"0-{CHUNK - 1}"}
            ) as resp:
                assert resp.status == 202
            data_file = data_dir / "uploads" / location.rsplit("/", 1)[1] / "data"
            url = f"{base}{location}" + (f"?digest={sha256(DATA)}" if method == "PUT" else "")
            await kill_mid_request(mirror, session, method, url, data_file, CHUNK + 1)
        assert data_file.stat().st_size > CHUNK  # half a chunk on disk at the moment of the kill

        with start(data_dir, port):
            async with session.head(f"{base}/v2/my/app/blobs/{sha256(DATA)}") as resp:
                assert resp.status == 404  # nothing half-written is visible
            async with session.get(f"{base}{location}") as resp:
                assert resp.status == 204
                assert resp.headers["Range"] == f"0-{CHUNK - 1}"  # what the client was last told
            async with session.patch(
                f"{base}{location}", data=DATA[CHUNK:], headers={"Content-Range": f"{CHUNK}-{len(DATA) - 1}"}
            ) as resp:
                assert resp.status == 202, await resp.text()
            async with session.put(f"{base}{location}?digest={sha256(DATA)}") as resp:
                assert resp.status == 201, await resp.text()
            async with session.get(f"{base}/v2/my/app/blobs/{sha256(DATA)}") as resp:
                assert await resp.read() == DATA
        assert not list((data_dir / "uploads").iterdir())
        assert not list((data_dir / "tmp").iterdir())


async def test_kill_during_monolithic_upload(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v2/my/app/blobs/uploads/?digest={sha256(DATA)}"
    async with aiohttp.ClientSession() as session:
        with start(data_dir, port) as mirror:
            release = asyncio.Event()
            request = asyncio.create_task(session.post(url, data=body_then_hang(DATA[:CHUNK], release)))
            await poll(lambda: any(p.stat().st_size >= CHUNK for p in (data_dir / "tmp").iterdir()))
            mirror.kill9()
            with pytest.raises(aiohttp.ClientError):
                await request
        with start(data_dir, port):
            async with session.head(f"{base}/v2/my/app/blobs/{sha256(DATA)}") as resp:
                assert resp.status == 404
            assert not list((data_dir / "tmp").iterdir())  # the temp file was removed at start-up
            async with session.post(url, data=DATA) as resp:
                assert resp.status == 201
