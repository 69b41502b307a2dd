"""``mirror serve --workers N``: several processes on one port and one data dir, supervised (``mirror.workers``).

A real Distribution upstream, behind nginx where a test needs the blob to arrive slowly; the mirror is the real
command with ``--workers 2``.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.credentials import basic, make_htpasswd
from tests.support.ops import (
    Mirror,
    blob_files,
    eventually,
    free_port,
    nginx_requests,
    run_cli,
    start_registry,
    throttled_upstream,
    upstream_requests,
    wait_until,
)
from tests.support.plain_http import push_blob

pytestmark = pytest.mark.integration
BIG = 8 * 2**20


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with throttled_upstream(
        tmp_path_factory.mktemp("workers"), slow="2m"
    ) as upstream:  # ~1 s for BIG at 8 MB/s, ~4 s at 2 MB/s
        yield upstream


def workers(mirror: Mirror) -> set[int]:
    """The pids of the workers booted so far, from the supervisor's log lines."""
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", mirror.log.read_text())}


def serving_pids(mirror: Mirror, path_part: str) -> set[int]:
    """The processes whose access log lines name ``path_part``."""
    pattern = re.compile(r"\[(\d+)\] aiohttp\.access: .*" + re.escape(path_part))
    return {int(m.group(1)) for m in pattern.finditer(mirror.log.read_text())}


def lock_holder(data_dir: Path) -> int | None:
    """The pid holding a fetch's lock file in ``tmp/`` (from the kernel's table of locks), or None."""
    inodes = {path.stat().st_ino for path in (data_dir / "tmp").glob("lock-*")}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) in inodes:
            return int(fields[4])
    return None


def client_pids(port: int) -> dict[int, int]:
    """Client port -> the pid of the worker holding that connection to the mirror's ``port`` (from ``ss``)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    found = {}
    for line in out.splitlines():
        pid = re.search(r"pid=(\d+)", line)
        if pid:
            found[int(line.split()[3].rsplit(":", 1)[1])] = int(pid.group(1))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def refused(url: str) -> bool:
    """Whether a new connection to ``url`` is refused. One accepted then dropped, or left waiting in the backlog of
    a worker that is closing its socket, is not (yet)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return False
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    except (OSError, http.client.HTTPException):
        return False
    return False


async def get_digest(session: aiohttp.ClientSession, url: str, received: list[int] | None = None) -> str:
    hasher = hashlib.sha256()
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_any():
            hasher.update(chunk)
            if received is not None:
                received[0] += len(chunk)
    return "sha256:" + hasher.hexdigest()


async def test_32_cold_gets_through_two_workers_make_one_upstream_get(upstream: dict[str, Any], tmp_path: Path) -> None:
    digest = push_blob(upstream["url"], "library/herd", os.urandom(BIG))
    with Mirror(tmp_path / "data", upstream["herd"], "--workers", "2") as mirror:
        wait_until(lambda: len(workers(mirror)) == 2, what="two workers booted")
        url = f"{mirror.url}/v2/library/herd/blobs/{digest}"
        connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a connection each, spread over the workers
        async with aiohttp.ClientSession(connector=connector) as session:
            bodies = await asyncio.gather(*(get_digest(session, url) for _ in range(32)))
        assert bodies == [digest] * 32  # every body verified
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1
        wait_until(lambda: blob_files(tmp_path / "data").get(digest) == BIG, what="the blob stored")
        # Sequential new connections land on both workers: they really share the port.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(40):
                assert await get_digest(session, url) == digest
        assert serving_pids(mirror, digest) == workers(mirror)
        assert upstream_requests(upstream["log"], "GET", f"/blobs/{digest}") == 1


async def test_a_worker_that_dies_is_replaced_and_the_mirror_keeps_serving(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    digest = push_blob(upstream["url"], "library/crash", os.urandom(4096))
    with Mirror(tmp_path / "data", upstream["url"], "--workers", "2") as mirror:
        wait_until(lambda: len(workers(mirror)) == 2, what="two workers booted")
        victim = min(workers(mirror))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(workers(mirror)) == 3, what="a third worker booted in the dead one's place")
        assert not alive(victim) and mirror.alive()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(20):
                assert await get_digest(session, f"{mirror.url}/v2/library/crash/blobs/{digest}") == digest
        assert victim not in serving_pids(mirror, digest)


async def test_kill_9_of_the_fetching_worker_mid_blob_is_continued_by_the_other(
    upstream: dict[str, Any], tmp_path: Path
) -> None:
    digest = push_blob(upstream["url"], "library/takeover", os.urandom(BIG))
    data = tmp_path / "data"
    with Mirror(data, upstream["slow"], "--workers", "2") as mirror:
        wait_until(lambda: len(workers(mirror)) == 2, what="two workers booted")
        url = f"{mirror.url}/v2/library/takeover/blobs/{digest}"
        received: list[list[int]] = []
        clients: list[asyncio.Future[str]] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
            # Clients one after another until both workers stream some (the kernel picks the worker).
            while len(clients) < 16 and (len(clients) < 4 or len(set(client_pids(mirror.port).values())) < 2):
                received.append([0])
                clients.append(asyncio.ensure_future(get_digest(session, url, received[-1])))
                await eventually(lambda: received[-1][0] > 0, what="the new client streaming")
            fetcher = lock_holder(data)
            assert fetcher in workers(mirror)
            assert set(client_pids(mirror.port).values()) == workers(mirror)
            os.kill(fetcher, signal.SIGKILL)
            outcomes = await asyncio.gather(*clients, return_exceptions=True)
        whole = [o for o in outcomes if isinstance(o, str)]
        cut = [o for o in outcomes if isinstance(o, aiohttp.ClientError)]  # the dead worker's own clients
        assert len(whole) + len(cut) == len(clients), outcomes
        assert whole and whole == [digest] * len(whole), "the other worker's clients end with the right bytes"
        requests = nginx_requests(upstream["slow_dir"], f"/blobs/{digest}", at_least=2)
        assert [status for _, status, _ in requests] == [200, 206], requests  # the rest asked with Range
        assert requests[1][2].startswith("bytes=")
        wait_until(lambda: blob_files(data).get(digest) == BIG, what="the blob stored")
        wait_until(lambda: not [p for p in (data / "tmp").iterdir() if not p.name.startswith("lock-")])
    assert "0 did not match" in run_cli("verify", "--data-dir", str(data)).stdout


async def test_sigterm_lets_a_download_in_flight_finish(upstream: dict[str, Any], tmp_path: Path) -> None:
    digest = push_blob(upstream["url"], "library/drain", os.urandom(BIG))
    mirror = Mirror(tmp_path / "data", upstream["slow"], "--workers", "2")
    try:
        wait_until(lambda: len(workers(mirror)) == 2, what="two workers booted")
        received = [0]
        async with aiohttp.ClientSession() as session:
            download = asyncio.ensure_future(
                get_digest(session, f"{mirror.url}/v2/library/drain/blobs/{digest}", received)
            )
            await eventually(lambda: received[0] > 0, what="the download under way")
            mirror.proc.send_signal(signal.SIGTERM)
            at_signal = received[0]
            await eventually(lambda: refused(mirror.url + "/readyz"), within=30, what="new connections refused")
            assert await download == digest  # drained: the whole blob, verified, after the SIGTERM
        assert at_signal < BIG  # the download was under way when the signal came
        assert mirror.proc.wait(30) == 0
        assert not any(alive(pid) for pid in workers(mirror))
        assert blob_files(tmp_path / "data")[digest] == BIG  # and stored
    finally:
        mirror.stop()


async def test_sighup_reads_the_htpasswd_file_again_and_keeps_a_broken_one_out(tmp_path: Path) -> None:
    htpasswd = make_htpasswd(tmp_path / "htpasswd", ("alice", "a-secret"))
    registry, url = start_registry(tmp_path / "registry")
    mirror = Mirror(tmp_path / "data", url, "--workers", "2", "--htpasswd", str(htpasswd), "--no-anonymous-pull")
    try:
        v2 = mirror.url + "/v2/"
        assert status_of(v2, basic("alice", "a-secret")) == 200
        assert status_of(v2, basic("bob", "b-secret")) == 401
        htpasswd.unlink()
        make_htpasswd(htpasswd, ("bob", "b-secret"))
        old = workers(mirror)
        mirror.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(workers(mirror)) >= len(old) + 2, what="a new generation of workers")
        wait_until(lambda: not any(alive(pid) for pid in old), what="the old generation gone")
        assert status_of(v2, basic("alice", "a-secret")) == 401
        for _ in range(10):  # on every worker
            assert status_of(v2, basic("bob", "b-secret")) == 200
        htpasswd.write_text("this is not an htpasswd line\n")
        # The supervisor may briefly run one worker more while it replaces a generation: wait for it to settle.
        wait_until(lambda: len({pid for pid in workers(mirror) if alive(pid)}) == 2, what="two workers running")
        booted = workers(mirror)
        running = {pid for pid in booted if alive(pid)}
        assert len(running) == 2
        mirror.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in mirror.log.read_text(), what="the broken file refused")
        await asyncio.sleep(1.0)  # no new workers come (they would read the broken file and fail to boot)
        assert mirror.alive() and workers(mirror) == booted and all(alive(pid) for pid in running)
        for _ in range(10):
            assert status_of(v2, basic("bob", "b-secret")) == 200
    finally:
        mirror.stop()
        registry.stop()


async def test_an_upstream_that_leads_back_to_the_mirror_is_a_loop_on_every_worker(tmp_path: Path) -> None:
    port = free_port()
    own = f"http://127.0.0.1:{port}"
    flags = ("--workers", "2", "--upstream-timeout", "5")
    with Mirror(tmp_path / "data", own, *flags, listen=f"127.0.0.1:{port}") as mirror:
        began = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(6):
                async with session.get(f"{own}/v2/library/loop/manifests/latest") as resp:
                    assert resp.status >= 500
        assert time.monotonic() - began < 5  # refused at once, not waited out
        # Whichever worker the mirror's own request reached refused it: one hop per client request, no chains.
        pattern = re.compile(r"aiohttp\.access: .*/v2/library/loop/manifests/latest")

        def logged() -> int:  # a worker writes its line once the answer is sent: wait for the last ones
            return len(pattern.findall(mirror.log.read_text()))

        wait_until(lambda: logged() >= 12, what="every request logged")
        await asyncio.sleep(0.5)  # no more lines come: a chain of hops would add some
        assert logged() == 12
