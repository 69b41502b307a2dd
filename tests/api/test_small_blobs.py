"""Small blobs (image configs, tiny layers) are answered from memory after their first hit; large ones by sendfile.
A client must not be able to tell the two apart, and memory must never serve bytes the disk lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.pull.blobs import SMALL_BLOB
from tests.conftest import MirrorClient, fetches_done
from tests.fakes.registry import FakeRegistry

HEADERS = ("Content-Type", "Docker-Content-Digest", "Accept-Ranges", "ETag", "Content-Length", "Content-Range")


async def answer(mirror: MirrorClient, method: str, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    resp = await mirror.request(method, path, headers=headers)
    body = await resp.read()
    return resp.status, {h: resp.headers[h] for h in HEADERS if h in resp.headers}, body


@pytest.mark.parametrize("size", [1024, SMALL_BLOB, SMALL_BLOB + 1, 3 * SMALL_BLOB], ids=lambda n: f"{n}B")
async def test_memory_and_file_answers_look_the_same(
    mirror_and_fake: tuple[MirrorClient, FakeRegistry], size: int
) -> None:
    mirror, fake = mirror_and_fake
    data = os.urandom(size)
    digest = fake.add_blob(data)
    path = f"/v2/library/small/blobs/{digest}"
    assert (await answer(mirror, "GET", path))[2] == data  # the miss, streamed
    fetched = len(fake.requests)

    status, headers, body = await answer(mirror, "GET", path)
    assert (status, body) == (200, data)
    assert headers == {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Content-Length": str(size),
    }
    status, head_headers, body = await answer(mirror, "HEAD", path)
    assert (status, body, head_headers) == (200, b"", headers)

    status, headers, body = await answer(mirror, "GET", path, Range="bytes=10-19")
    assert (status, body) == (206, data[10:20])
    assert headers["Content-Range"] == f"bytes 10-19/{size}" and headers["Content-Length"] == "10"
    status, _, body = await answer(mirror, "GET", path, Range=f"bytes={size}-")
    assert status == 416
    status, _, body = await answer(mirror, "GET", path, **{"If-None-Match": f'"{digest}"'})
    assert (status, body) == (304, b"")
    assert len(fake.requests) == fetched  # every answer above came from the cache


async def test_a_small_blob_damaged_on_disk_is_fetched_again(
    mirror_and_fake: tuple[MirrorClient, FakeRegistry], tmp_path: Path
) -> None:
    mirror, fake = mirror_and_fake
    data = os.urandom(2048)
    digest = fake.add_blob(data)
    path = f"/v2/library/small/blobs/{digest}"
    assert (await answer(mirror, "GET", path))[2] == data
    await fetches_done(mirror)
    stored = tmp_path / "data" / "blobs" / "sha256" / digest[7:9] / digest[7:]
    stored.write_bytes(bytes(2048))  # same size, wrong bytes: bit rot, or a hand edit
    status, _, body = await answer(mirror, "GET", path)
    assert (status, body) == (200, data)
    assert fake.count("GET", "blobs") == 2
    await fetches_done(mirror)
    assert stored.read_bytes() == data
