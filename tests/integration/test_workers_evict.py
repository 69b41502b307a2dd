"""Removing content from the CLI beside ``mirror serve --workers 2`` on the same data dir: ``mirror evict``, ``gc``
and ``verify`` take the servers' eviction lock (``storage.evictlock``), waiting for a server's eviction (or
giving up with a clear message), and a blob a worker is sending survives its eviction by another process.

Why the blob survives: the usage table's leases are per process (the CLI cannot see them), but a worker sends a
stored blob from a descriptor it opened before the first byte (``api.blobs.BlobFileResponse``), and an unlinked
file stays readable through its open descriptors; a file gone between a worker's lookup and its open is a miss
(fetched again), never a 404. So the server-side check covers what cross-process leases would.

A real Distribution upstream; the mirror is the real command with ``--workers 2``; the CLI runs as an operator
runs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.lockholder import hold, killed
from tests.support.ops import (
    Mirror,
    blob_files,
    eventually,
    mirror_env,
    run_cli,
    start_registry,
    upstream_requests,
    wait_until,
)
from tests.support.plain_http import pull, push_blob, push_random_image

pytestmark = pytest.mark.integration
BIG = 48 * 2**20  # far more than loopback's socket buffers hold: the worker is mid-send while the client pauses
FIRST = 2**20  # what the slow client reads before it pauses


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("evict")
    registry, url = start_registry(work / "registry", access_log=True)
    try:
        data = os.urandom(BIG)
        yield {
            "url": url,
            "log": work / "registry" / "registry.log",
            "data": data,
            "digest": push_blob(url, "library/big", data),
        }
    finally:
        registry.stop()


def evicted(flags: tuple[str, ...], digest: str) -> bool:
    """Run ``mirror evict`` once; whether it removed ``digest`` (it does once the blob was idle long enough)."""
    return f"evicted {digest}" in run_cli("evict", *flags).stdout


async def test_mirror_evict_of_a_blob_a_worker_is_sending_never_cuts_the_client(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    data_dir, config = tmp_path / "data", tmp_path / "mirror.toml"
    config.write_text("[cache]\nflush_interval = 0.2\n")
    # The low watermark under the blob, the high one over it: the servers never evict it, `mirror evict` does.
    flags = ("--data-dir", str(data_dir), "--cache-size", str(int(BIG / 0.9)), "--config", str(config))
    digest = upstream["digest"]
    url = f"/v2/library/big/blobs/{digest}"
    with Mirror(data_dir, upstream["url"], "--workers", "2", *flags[2:]) as mirror:
        async with aiohttp.ClientSession(mirror.url) as session:
            async with session.get(url) as resp:  # cold: fetched and stored
                assert resp.status == 200
                assert await resp.read() == upstream["data"]
            async with session.get(url) as resp:  # a hit, sent by sendfile to a client that reads slowly
                assert resp.status == 200
                first = await resp.content.readexactly(FIRST)
                # The CLI cannot see the worker's lease: it removes the blob once it has been idle for its
                # min_idle (the last served time is when this request began).
                await asyncio.to_thread(
                    wait_until, lambda: evicted(flags, digest), 30, "mirror evict removing the blob"
                )
                stored = data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
                assert not stored.exists()
                rest = await resp.read()  # the worker goes on sending from its open descriptor
            assert len(first) + len(rest) == BIG
            assert hashlib.sha256(first + rest).hexdigest() == digest[7:]
            async with session.get(url) as resp:  # evicted: a miss, fetched again
                assert resp.status == 200
                assert await resp.read() == upstream["data"]
    assert upstream_requests(upstream["log"], "GET", url) == 2


def holding_the_lock(pid: int, lock: Path) -> bool:
    """Whether process ``pid`` has ``lock`` open (it waits for it: it opens the file to try the lock)."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(lock) for fd in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("command", ["evict", "gc", "verify"])
async def test_a_cli_removal_waits_for_the_eviction_lock_and_gives_up_with_a_clear_message(
    upstream: dict[str, Any], tmp_path: Path, command: str
) -> None:
    data_dir = tmp_path / "data"
    with Mirror(data_dir, upstream["url"], "--workers", "2", "--cache-size", "1GiB"):
        lock = data_dir / "evict.lock"
        holder = await hold(lock)  # what a server's evictor does while it evicts: flock(LOCK_EX) on the file
        try:
            began = time.monotonic()
            refused = run_cli(command, "--data-dir", str(data_dir), "--lock-timeout", "0.5", check=False)
            assert time.monotonic() - began >= 0.5
            assert refused.returncode == 1, refused
            assert "another process on this data dir held" in refused.stderr
            assert "--lock-timeout" in refused.stderr
            waiting = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mirror", command, "--data-dir", str(data_dir), "--lock-timeout", "60",
                env=mirror_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await asyncio.to_thread(
                wait_until, lambda: holding_the_lock(waiting.pid, lock), 30, "the command trying the lock"
            )
            assert waiting.returncode is None
        finally:
            await killed(holder)  # the kernel releases the lock
        out, err = await asyncio.wait_for(waiting.communicate(), 60)
        assert waiting.returncode == 0, (out, err)


EVICTED = re.compile(r"evicted (\d+) entries \((\d+) bytes\) in \S+ \(from (\S+) to (\S+)\)")
LEFT = "another process on the data dir is evicting: leaving it to that one"
IMAGES, LAYER = 12, 200 * 2**10  # 2.4 MiB against a 2 MiB cache


async def test_no_worker_evicts_while_a_cli_command_holds_the_lock(upstream: dict[str, Any], tmp_path: Path) -> None:
    """With the previous test (a CLI command removes nothing before it holds the lock) this makes the two kinds of
    evictor exclusive: a worker over the cap waits for the lock, then evicts."""
    url = upstream["url"]
    images = [push_random_image(url, f"library/small{i}", "latest", [os.urandom(LAYER)]) for i in range(IMAGES)]
    data_dir, config = tmp_path / "data", tmp_path / "mirror.toml"
    config.write_text("[cache]\nflush_interval = 0.2\n")
    flags = ("--workers", "2", "--cache-size", "2MiB", "--config", str(config), "--log-level", "debug")
    with Mirror(data_dir, url, *flags) as mirror:
        holder = await hold(data_dir / "evict.lock")  # as `mirror evict` holds it while it evicts
        try:
            for i, image in enumerate(images):
                received = await asyncio.to_thread(pull, mirror.url, f"small{i}", "latest")
                assert set(received["blobs"]) == {image["config"], *image["layers"]}
            await eventually(lambda: LEFT in mirror.log.read_text(errors="replace"), what="a worker over the cap")
            assert not EVICTED.search(mirror.log.read_text(errors="replace")), "a worker evicted under the lock"
            assert sum(blob_files(data_dir).values()) > 0.95 * 2 * 2**20
        finally:
            await killed(holder)  # the kernel releases the lock

        def evicted_under_the_cap() -> bool:
            logged = EVICTED.search(mirror.log.read_text(errors="replace")) is not None  # written after the unlinks
            return logged and sum(blob_files(data_dir).values()) <= 0.95 * 2 * 2**20

        await eventually(evicted_under_the_cap, what="a worker evicting under the cap once the lock is free")


async def test_gc_through_a_workers_admin_api_waits_for_the_eviction_lock(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    """``POST /admin/v1/gc`` removes content in whichever worker takes it: it waits while another process (here one
    holding the lock as an evicting worker or ``mirror evict`` does) removes content, and runs once it is free."""
    data_dir = tmp_path / "data"
    with Mirror(data_dir, upstream["url"], "--workers", "2", "--admin-api") as mirror:
        holder = await hold(data_dir / "evict.lock")
        async with aiohttp.ClientSession() as session:
            try:
                collect = asyncio.create_task(session.post(f"{mirror.url}/admin/v1/gc"))
                await asyncio.sleep(1.5)
                assert not collect.done(), "gc ran while another process held the eviction lock"
            finally:
                await killed(holder)  # the kernel releases the lock
            async with asyncio.timeout(30):
                response = await collect
            assert response.status == 200 and "removed" in await response.json()
            response.release()
