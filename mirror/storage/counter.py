"""A counter shared by the processes serving one data dir, readable on the hot path for free.

The counter is 8 bytes in a small file that every process maps into memory (``MAP_SHARED``): reading it is a
memory read, with no system call, so a request can ask "did another process change this since I looked?" at no
cost. Bumping it (rare: a change worth telling the others) takes an flock on the file so that two bumps never
lose one, and runs in a thread. A read racing a bump sees the old or the new value, or at worst a value that
differs from both; all a reader does with it is compare, so it refreshes once more than needed, never less.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol


class ChangeCounter(Protocol):
    """A number that goes up when one process changes something the others keep in memory: ``SharedCounter``
    (processes on one data dir) or ``storage.rediscounter.RedisCounter`` (replicas)."""

    def value(self) -> int: ...  # on the hot path: a memory read

    def bump_sync(self) -> int: ...  # blocking: in a thread

    def lifecycle(self, app: Any) -> AsyncIterator[None]: ...  # for ``app.cleanup_ctx``


_FORMAT = "<Q"
_SIZE = struct.calcsize(_FORMAT)


class SharedCounter:
    def __init__(self, path: Path):
        self._path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)  # the mapping keeps the file

    def value(self) -> int:
        return int(struct.unpack_from(_FORMAT, self._map, 0)[0])

    def bump_sync(self) -> int:
        """Add one, for every process to see; returns the new value (blocking: in a thread)."""
        with open(self._path, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                value = self.value() + 1
                struct.pack_into(_FORMAT, self._map, 0, value)
                return value
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()

    async def lifecycle(self, _app: Any) -> AsyncIterator[None]:
        yield
        self.close()
