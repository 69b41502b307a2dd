"""The web page's list of fetches in flight with several processes on one data dir (``--workers``): whichever
process answers the page lists the fetches every process runs, those of the others read from their lock files
(``FetchLocks.held_sync``), with the repository and the bytes so far, and no client count it cannot know."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.ops import coordinated_mirrors, eventually, start_nginx, start_registry
from tests.support.plain_http import push_blob

pytestmark = pytest.mark.integration
SIZE = 4 * 2**20


def fetches(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url + "/ui/inflight.json", timeout=10) as resp:
        return list(json.loads(resp.read())["fetches"])


async def test_a_fetch_of_one_process_is_listed_by_the_other(tmp_path: Path) -> None:
    registry, url = start_registry(tmp_path / "registry")
    nginx, slow = start_nginx(tmp_path / "nginx", url, throttle="1m")  # ~4 s for the blob
    digest = push_blob(url, "library/listed", os.urandom(SIZE))
    first, second = coordinated_mirrors(tmp_path / "data", slow)
    try:
        received = [0]

        async def download() -> None:
            blob = f"{first.url}/v2/library/listed/blobs/{digest}"
            async with aiohttp.ClientSession() as session, session.get(blob) as resp:
                async for chunk in resp.content.iter_any():
                    received[0] += len(chunk)

        task = asyncio.ensure_future(download())
        await eventually(lambda: received[0] > 0, what="the download under way")
        await eventually(lambda: bool(fetches(second.url)), what="the other process listing the fetch")
        (row,) = fetches(second.url)
        assert (row["digest"], row["repo"], row["upstream"]) == (digest, "docker.io/library/listed", "docker.io")
        assert row["size"] == SIZE and 0 < row["written"] <= SIZE and row["clients"] is None
        (own,) = fetches(first.url)  # the process that runs it counts its client
        assert own["digest"] == digest and own["clients"] == 1
        await task
        assert received[0] == SIZE
        await eventually(lambda: fetches(second.url) == [], what="the finished fetch leaving the list")
    finally:
        first.stop()
        second.stop()
        nginx.stop()
        registry.stop()
