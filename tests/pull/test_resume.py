"""Resuming a blob fetch whose process died mid-blob (``pull.resume``, through ``pull.filelock``): the mirror under
test (coordination "files") follows a fetch another process holds; that process, a real child holding the key's
lock over a partial temp file, dies by SIGKILL; the mirror takes the fetch over from the bytes on disk and asks a
real Distribution registry, through nginx, for the rest. One nginx passes Range on (206); the other strips it, as
an upstream that ignores Range does (200). Nginx's access log shows what was asked and answered."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from mirror.oci.reference import Digest
from mirror.storage.blobs import BlobStore
from tests.support.lockholder import hold, killed
from tests.support.ops import blob_files, eventually, nginx_requests, start_nginx, start_registry
from tests.support.plain_http import push_blob

SIZE = 3 * 2**20 + 12345


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("resume")
    registry, url = start_registry(work / "registry")
    ranges, ranges_url = start_nginx(work / "ranges", url, log=True)
    # Range not passed on, and nginx's own byte ranges off: every answer is the whole blob with 200.
    whole, whole_url = start_nginx(work / "whole", url, 'proxy_set_header Range ""; max_ranges 0;', log=True)
    try:
        yield {"url": url, "206": (ranges_url, work / "ranges"), "200": (whole_url, work / "whole")}
    finally:
        whole.stop()
        ranges.stop()
        registry.stop()


@dataclass(frozen=True)
class Case:
    answer: str  # "206" or "200": what the upstream answers a Range request with
    on_disk: float  # the share of the blob the dead process left in its temp file
    damaged: bool  # one byte of it wrong (a torn write, a bad disk)
    completes: bool
    asked: tuple[int, ...]  # statuses of the upstream requests nginx saw, each with Range: bytes=<on disk>-


CASES = {
    "206 for the rest -> appended; the client completes": Case("206", 0.4, False, True, (206,)),
    "200 (Range ignored) -> the first bytes checked against the file, the rest appended; completes": Case(
        "200", 0.4, False, True, (200,)
    ),
    "damaged partial file, 206 -> the digest check fails: cut, nothing published": Case(
        "206", 0.4, True, False, (206,)
    ),
    "damaged partial file, 200 -> its bytes differ from the upstream's: cut, nothing published": Case(
        "200", 0.4, True, False, (200,)
    ),
    "every byte on disk -> only the digest check, no upstream request; completes": Case("206", 1.0, False, True, ()),
    "every byte on disk, damaged -> the digest check fails: cut, no upstream request": Case(
        "206", 1.0, True, False, ()
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_a_fetch_left_by_a_dead_process_is_continued(
    upstreams: dict[str, Any], aiohttp_client: AiohttpClient, tmp_path: Path, case: Case
) -> None:
    data = os.urandom(SIZE)
    digest = push_blob(upstreams["url"], "library/resume", data)
    url, nginx_dir = upstreams[case.answer]
    config = Config(
        data_dir=tmp_path / "data",
        coordination="files",
        upstreams=(UpstreamConfig(registry="docker.io", url=url, default=True),),
    )
    client = await aiohttp_client(create_app(config))
    store = BlobStore(tmp_path / "data")
    key = Digest.parse(digest)
    partial = bytearray(data[: int(SIZE * case.on_disk)])
    if case.damaged:
        partial[len(partial) // 2] ^= 0xFF
    temp = store.fetch_temp_path("docker.io", key)
    temp.write_bytes(partial)
    lock = store.tmp_dir / f"lock-{store.fetch_key('docker.io', key)}"
    holder = await hold(lock, f"{SIZE} {os.stat(temp).st_ino}\n")
    received = bytearray()
    cut: Exception | None = None
    try:
        async with client.get(f"/v2/library/resume/blobs/{digest}") as resp:
            assert resp.status == 200 and resp.content_length == SIZE
            while len(received) < len(partial) - 1:  # what the dead process wrote, but its last byte
                received += await resp.content.readany()
            await killed(holder)
            try:
                async for chunk in resp.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError as exc:
                cut = exc
    finally:
        await killed(holder)
    asked = [("GET", status, f"bytes={len(partial)}-") for status in case.asked]
    # nginx logs a request once it ends: a body the mirror stopped reading ends when nginx notices.
    await eventually(lambda: nginx_requests(nginx_dir, f"/blobs/{digest}") == asked, what=f"nginx's log: {asked}")
    if case.completes:
        assert cut is None and bytes(received) == data
        await eventually(lambda: blob_files(tmp_path / "data").get(digest) == SIZE, what="the blob stored")
    else:
        assert cut is not None and len(received) < SIZE, "cut, never a complete body"
        assert digest not in blob_files(tmp_path / "data")
    await eventually(lambda: list(store.tmp_dir.iterdir()) == [], what="nothing partial left in tmp/")
    async with client.get(f"/v2/library/resume/blobs/{digest}") as again:  # served whole either way
        assert again.status == 200 and hashlib.sha256(await again.read()).hexdigest() == key.hex
