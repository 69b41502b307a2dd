"""Helpers for the operating tests (eviction, gc, crash safety): polling with a deadline, and a disk watcher."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


async def eventually(predicate: Callable[[], bool], within: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds. For background work we cannot await."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {within} s")
        await asyncio.sleep(0.01)


def wait_until(predicate: Callable[[], bool], within: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {within} s")
        time.sleep(0.02)


def bytes_under(*dirs: Path) -> int:
    total = 0
    for top in dirs:
        for root, _, files in os.walk(top):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, name)).st_size
    return total


def blob_files(data_dir: Path) -> dict[str, int]:
    """``{"sha256:...": size}`` of every file in the store."""
    found = {}
    for path in (data_dir / "blobs").glob("*/*/*"):
        found[f"{path.parent.parent.name}:{path.name}"] = path.stat().st_size
    return found


class DiskWatch:
    """Samples the bytes under blobs/ and tmp/ from a thread, as often as it can, and keeps the maximum."""

    def __init__(self, data_dir: Path):
        self.dirs = (data_dir / "blobs", data_dir / "tmp")
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, bytes_under(*self.dirs))
            self.samples += 1

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, bytes_under(*self.dirs))
