"""Pushed content through ``mirror serve --workers 2``: a manifest deleted, or a tag moved, through one worker is
never answered the old way by the other. The local registry keeps no memory copy of manifests, tags or links (each
read goes to the shared index and the store; only the names of local repositories are held in memory, refreshed
through a ``SharedCounter``), so there is nothing per worker to invalidate; these tests hold that in place.

Plain HTTP pushes and pulls (``tests.support.plain_http``); every phase checks that both workers answered.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import aiohttp
import pytest

from tests.support.ops import NO_UPSTREAM, Mirror, eventually
from tests.support.plain_http import OCI_INDEX, OCI_MANIFEST, push_random_image

pytestmark = pytest.mark.integration
GETS = 50
ACCEPT = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}


def serving_pids(log: Path, since: int, path_part: str) -> set[int]:
    """The worker processes whose access log lines after byte ``since`` name ``path_part``."""
    pattern = re.compile(r"\[(\d+)\] aiohttp\.access: .*" + re.escape(path_part))
    return {int(m.group(1)) for m in pattern.finditer(log.read_bytes()[since:].decode(errors="replace"))}


async def answers(mirror: Mirror, path: str) -> list[tuple[int, str]]:
    """``GETS`` concurrent GETs of ``path``, each on its own connection (spread over the workers): for each, the
    status and the digest served, or the error code."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(mirror.url, connector=connector) as session:

        async def one() -> tuple[int, str]:
            async with session.get(path, headers=ACCEPT) as resp:
                if resp.status == 200:
                    await resp.read()
                    return resp.status, resp.headers["Docker-Content-Digest"]
                return resp.status, (await resp.json())["errors"][0]["code"]

        return await asyncio.gather(*(one() for _ in range(GETS)))


async def phase(mirror: Mirror, path: str, rounds: int = 10) -> list[tuple[int, str]]:
    """``answers``, as many rounds as it takes both workers to answer some (on a busy machine the kernel may hand
    one round's connections to the one worker that is running): every answer of every round."""
    since = mirror.log.stat().st_size
    found: list[tuple[int, str]] = []
    for _ in range(rounds):
        found += await answers(mirror, path)
        try:  # a worker logs a request once it has answered it: the lines may follow the answers by a moment
            await eventually(lambda: len(serving_pids(mirror.log, since, path)) >= 2, within=2, what="two workers")
            return found
        except AssertionError:
            continue
    raise AssertionError(f"only {serving_pids(mirror.log, since, path)} answered {path} in {rounds} rounds")


async def test_a_manifest_deleted_through_one_worker_is_unknown_to_both(tmp_path: Path) -> None:
    with Mirror(tmp_path / "data", NO_UPSTREAM, "--workers", "2") as mirror:
        image = await asyncio.to_thread(push_random_image, mirror.url, "team/app", "v1", [os.urandom(1000)])
        digest = image["manifest"]
        by_digest, by_tag = f"/v2/team/app/manifests/{digest}", "/v2/team/app/manifests/v1"
        for path in (by_digest, by_tag):  # both workers read it (and would hold it, if they kept copies)
            assert set(await phase(mirror, path)) == {(200, digest)}
        async with aiohttp.ClientSession(mirror.url) as session, session.delete(by_digest) as resp:
            assert resp.status == 202
        for path in (by_digest, by_tag):
            assert set(await phase(mirror, path)) == {(404, "MANIFEST_UNKNOWN")}


async def test_a_tag_moved_through_one_worker_is_served_new_by_both(tmp_path: Path) -> None:
    with Mirror(tmp_path / "data", NO_UPSTREAM, "--workers", "2") as mirror:
        old = await asyncio.to_thread(push_random_image, mirror.url, "team/moving", "latest", [os.urandom(1000)])
        path = "/v2/team/moving/manifests/latest"
        assert set(await phase(mirror, path)) == {(200, old["manifest"])}
        new = await asyncio.to_thread(push_random_image, mirror.url, "team/moving", "latest", [os.urandom(1000)])
        assert new["manifest"] != old["manifest"]
        assert set(await phase(mirror, path)) == {(200, new["manifest"])}
