"""The ref locks of manifest and tag requests across processes (``storage.reflocks``): the holder is a real child
process (``tests.support.lockholder``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from mirror.storage.reflocks import RefLocks
from tests.support.lockholder import hold, killed

KEY = "tag docker.io library/alpine latest"


async def test_a_free_lock_is_held_inside_the_block_and_its_file_removed_after(tmp_path: Path) -> None:
    locks = RefLocks(tmp_path)
    async with locks.hold(KEY, within=1.0) as held:
        assert held and await asyncio.to_thread(os.listdir, tmp_path) == [locks.path(KEY).name]
        async with locks.hold(KEY, within=0.05) as again:  # another holder (a second open file) must wait
            assert not again
    assert await asyncio.to_thread(os.listdir, tmp_path) == [], "the lock file removed on release"


async def test_a_waiter_takes_the_lock_when_the_other_process_lets_go(tmp_path: Path) -> None:
    locks = RefLocks(tmp_path)
    holder = await hold(locks.path(KEY))
    entered = asyncio.Event()

    async def wait() -> bool:
        async with locks.hold(KEY, within=30.0) as held:
            entered.set()
            return held

    waiter = asyncio.ensure_future(wait())
    done, _ = await asyncio.wait({waiter}, timeout=0.2)  # a check that nothing happens: bounded by a time
    assert not done and not entered.is_set()
    await killed(holder)  # the kernel releases its lock
    assert await asyncio.wait_for(waiter, 10)


async def test_a_lock_held_past_within_lets_the_caller_go_ahead_without_it(tmp_path: Path) -> None:
    locks = RefLocks(tmp_path)
    holder = await hold(locks.path(KEY))
    try:
        async with locks.hold(KEY, within=0.1) as held:
            assert not held
    finally:
        await killed(holder)
