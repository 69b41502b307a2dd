"""The ``flock``s of upload sessions shared by the processes on one data dir (``storage.sessions``): one per
session (``uploads/<uuid>/lock``: one request at a time on a session) and one for creating sessions
(``uploads/.create.lock``: the caps are checked and the session made in one step). The kernel releases a lock
when its holder dies. Blocking: call these in a thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

CREATE_LOCK = ".create.lock"


def flock_sync(path: Path) -> int:
    """Wait for an exclusive lock on ``path`` (created if missing); its descriptor (close it to release), or -1
    when the directory is gone (the session was removed)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def close_if_taken(waited: asyncio.Future[int]) -> None:
    """A done-callback for a ``flock_sync`` nobody waits for any more (cancelled): release what it took."""
    if not waited.cancelled() and waited.exception() is None and waited.result() >= 0:
        os.close(waited.result())  # instant


def held_elsewhere_sync(path: Path) -> bool:
    """Someone holds the lock on ``path`` (tried without waiting; never created)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
