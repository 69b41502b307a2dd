"""One evicting process at a time among the processes sharing a data dir: an exclusive ``flock`` on
``<data-dir>/evict.lock``. A server tries it without waiting (a process that finds it held leaves the work to the
holder, which plans from the whole table, and tries again at its next housekeeping round); a CLI command that
removes content (``mirror evict``, ``gc``, ``verify``) waits for it, up to a timeout. The kernel releases it when
its holder dies. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

POLL = 0.05  # seconds between tries while waiting: flock has no timeout of its own


class EvictionBusy(Exception):
    """Another process held the lock for the whole wait."""


class EvictionTurn(Protocol):
    """One evicting process at a time: ``EvictionLock`` on a data dir, ``redislocks.RedisEvictionLock`` in a
    cluster."""

    def try_acquire_sync(self) -> bool: ...

    def acquire_sync(self, timeout: float) -> None: ...

    def release_sync(self) -> None: ...


class EvictionLock:
    def __init__(self, data_dir: Path):
        self.path = data_dir / "evict.lock"
        self._fd = -1

    def try_acquire_sync(self) -> bool:
        """Take the lock if no other process holds it; False if one does."""
        return self._take(lambda: False)

    def acquire_sync(self, timeout: float) -> None:
        """Take the lock, waiting up to ``timeout`` seconds for the process that holds it; EvictionBusy after."""
        deadline = time.monotonic() + timeout

        def wait() -> bool:
            if time.monotonic() >= deadline:
                raise EvictionBusy(
                    f"another process on this data dir held {self.path} (a server evicting, or another "
                    f"mirror evict, gc or verify) for {timeout:g} s; try again later or wait longer (--lock-timeout)"
                )
            time.sleep(POLL)
            return True

        self._take(wait)

    def _take(self, again: Callable[[], bool]) -> bool:
        """Try the lock on one descriptor until it is taken (True) or ``again`` says to stop (False)."""
        assert self._fd < 0, "taken twice"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not again():
                        os.close(fd)
                        return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release_sync(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = -1
