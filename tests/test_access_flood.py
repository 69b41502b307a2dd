"""A flood of wrong passwords must not stall anyone else, nor tell which user names exist.

bcrypt is deliberately slow (~0.15 s at cost 11 here). It runs on its own small executor with a bounded queue
(past the bound: 429 at once), so the default thread pool that cache hits use for file and index work stays free;
unknown users are checked against a dummy hash of the same cost; an address with repeated failures gets 429
with ``Retry-After`` before bcrypt runs.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import MirrorClient, MirrorFactory
from tests.support.credentials import basic
from tests.support.ops import require
from tests.support.pushing import error_code, push_image

ALICE = ("alice", "correct horse")
FLOOD = 120


def slow_htpasswd(path: Path, cost: int, *users: tuple[str, str]) -> Path:
    """Entries written by the real ``htpasswd -B`` at a realistic cost (the tests elsewhere use 5 for speed)."""
    for number, (user, password) in enumerate(users):
        flags = "-bBC" if number else "-cbBC"
        subprocess.run([require("htpasswd"), flags, str(cost), str(path), user, password], check=True)
    return path


async def anonymous_latencies(client: MirrorClient, until: asyncio.Future[list[int]]) -> list[float]:
    """Anonymous cache hits (ping, manifest, blob) one after another until ``until`` is done."""
    latencies: list[float] = []
    while not until.done() or len(latencies) < 3:
        for path in ("/v2/my/app/manifests/1.0", "/v2/my/app/tags/list"):
            started = time.monotonic()
            resp = await client.get(path)
            await resp.read()
            latencies.append(time.monotonic() - started)
            assert resp.status == 200, path
    return latencies


async def test_wrong_password_flood_does_not_stall_anonymous_pulls(
    push_mirror: MirrorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One client address sends everything here; the per-address brake is lifted so that the flood reaches bcrypt
    # (the bounded executor is what is under test).
    monkeypatch.setattr("mirror.access.FAILURES_ALLOWED", 10**6, raising=False)
    htpasswd = slow_htpasswd(tmp_path / "htpasswd", 11, ALICE)
    client = await push_mirror(htpasswd=htpasswd)
    await push_image(client, "my/app", "1.0", [b"layer"], headers=basic(*ALICE))
    url = str(client.make_url("/v2/"))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def attempt(number: int) -> int:
            async with session.get(url, headers=basic("alice", f"guess {number}")) as resp:
                return resp.status

        assert (await client.get("/v2/my/app/manifests/1.0")).status == 200  # warm: the first hit opens files
        started = time.monotonic()
        attempts = [asyncio.ensure_future(attempt(n)) for n in range(FLOOD)]
        # From the first answer on, the 120 requests have been read (the in-process client and server share one
        # event loop, so their arrival itself is a burst of work) and the password checks are running.
        await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED)
        flood = asyncio.ensure_future(asyncio.gather(*attempts))
        latencies = await anonymous_latencies(client, flood)
        statuses = await flood
        flood_seconds = time.monotonic() - started
    p50, worst = statistics.median(latencies), max(latencies)
    print(f"\n{FLOOD} wrong passwords in {flood_seconds:.2f} s; {len(latencies)} anonymous hits meanwhile: "
          f"p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms; answers {sorted(set(statuses))}")  # fmt: skip
    assert set(statuses) <= {401, 429}
    # Before the bounded executor, hits waited 15-34 s behind the checks; the bound is loose for a loaded machine.
    assert worst < 3.0, f"an anonymous hit waited {worst:.2f} s behind the password checks"
    assert p50 < 0.25
    assert (await client.get("/v2/", headers=basic(*ALICE))).status == 200  # the real user still gets in


@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The hashes bcrypt was asked to check against, in order."""
    import bcrypt

    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


async def test_unknown_user_costs_a_bcrypt_check_of_the_same_cost(
    push_mirror: MirrorFactory, tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    htpasswd = slow_htpasswd(tmp_path / "htpasswd", 8, ALICE, ("bob", "other"))
    client = await push_mirror(htpasswd=htpasswd)
    for user in ("alice", "mallory"):
        resp = await client.get("/v2/", headers=basic(user, "wrong"))
        assert resp.status == 401
        assert await error_code(resp) == "UNAUTHORIZED"
    known, unknown = bcrypt_calls
    assert known.startswith(b"$2y$08$")
    assert unknown[4:7] == b"08$" and unknown != known  # the dummy: same cost, another salt


async def test_repeated_failures_from_one_address_are_braked(
    push_mirror: MirrorFactory, tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    htpasswd = slow_htpasswd(tmp_path / "htpasswd", 5, ALICE)
    client = await push_mirror(htpasswd=htpasswd)
    for number in range(5):
        assert (await client.get("/v2/", headers=basic("alice", f"guess {number}"))).status == 401
    assert len(bcrypt_calls) == 5
    for headers in (basic("alice", "guess 6"), basic(*ALICE)):  # braked, right password or not: no oracle
        resp = await client.get("/v2/my/app/manifests/1.0", headers=headers)
        assert resp.status == 429
        assert await error_code(resp) == "TOOMANYREQUESTS"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert len(bcrypt_calls) == 5  # the braked attempts ran no bcrypt
    assert (await client.get("/v2/_catalog")).status == 200  # anonymous pulls from that address go on


async def test_password_checks_past_the_bound_are_refused_at_once(
    push_mirror: MirrorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every bcrypt thread busy and the queue full, the next checks are a 429 at once, not a wait."""
    import threading

    import bcrypt

    monkeypatch.setattr("mirror.access.FAILURES_ALLOWED", 10**6, raising=False)
    release = threading.Event()

    def blocked(password: bytes, hashed: bytes) -> bool:
        release.wait(30)
        return False

    monkeypatch.setattr(bcrypt, "checkpw", blocked)
    client = await push_mirror(htpasswd=slow_htpasswd(tmp_path / "htpasswd", 5, ALICE))
    url = str(client.make_url("/v2/"))
    bound, extra = 2 + 16, 5  # BCRYPT_THREADS + BCRYPT_QUEUE in mirror.credentials
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def attempt(number: int) -> tuple[int, str | None]:
            async with session.get(url, headers=basic("alice", f"guess {number}")) as resp:
                return resp.status, resp.headers.get("Retry-After")

        attempts = [asyncio.ensure_future(attempt(n)) for n in range(bound + extra)]
        try:
            # Until bcrypt is released only refusals can come back: wait for all of them.
            done: set[asyncio.Future[tuple[int, str | None]]] = set()
            while len(done) < extra:
                finished, _ = await asyncio.wait(set(attempts) - done, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                assert finished, "a check past the bound waited"
                done |= finished
            assert [f.result() for f in done] == [(429, "1")] * extra
        finally:
            release.set()
        answers = await asyncio.gather(*attempts)
    assert sorted(status for status, _ in answers) == [401] * bound + [429] * extra
