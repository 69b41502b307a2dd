"""Locks of the upstream requests about one ref (a tag, a manifest by digest) across processes sharing one data
dir: the whole host asks the upstream about a ref once at a time (``pull.service``; the callers inside one process
are already coalesced into one). One file per key in ``tmp/``::

    lock-ref-<hash of the key>   exclusive ``flock`` of the process asking the upstream now (released by the kernel
                                 if that process dies), removed by its holder when it lets go

The rules of ``fetchlocks`` hold (``try_lock_sync``): the holder removes the file before it lets go, and a lock
taken on a file no longer at the path is dropped and taken again. ``FetchLocks.clean_sync`` removes a dead
holder's file at start-up like any other lock file nobody holds.

A lock is tried without blocking, in a thread; while another process holds it, it is tried again every ``poll``
seconds (a thread blocked in ``flock`` could not be stopped, and nothing a task could await tells of a release by
another process), for at most ``within`` seconds: past that the block runs without it and the caller decides (the
pull service answers as for an upstream that was slow past its timeout). The lock saves upstream requests; it
guards no data (each process verifies what it stores).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mirror.storage.blobs import LOCK_PREFIX
from mirror.storage.fetchlocks import release_lock_sync, try_lock_sync

log = logging.getLogger(__name__)
REF_PREFIX = f"{LOCK_PREFIX}ref-"
POLL = 0.005  # seconds between tries of a lock another process holds


class RefLocks:
    """The ref locks of one data dir's ``tmp/``. Owned by the app (no module state)."""

    def __init__(self, tmp_dir: Path, poll: float = POLL):
        self._tmp_dir = tmp_dir
        self._poll = poll

    def path(self, key: str) -> Path:
        return self._tmp_dir / f"{REF_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    @asynccontextmanager
    async def hold(self, key: str, within: float) -> AsyncIterator[bool]:
        """Hold ``key``'s lock inside the block: True, or False when another process held it for ``within``
        seconds (the block runs without it)."""
        path = self.path(key)
        deadline = time.monotonic() + within
        fd, _ = await asyncio.to_thread(try_lock_sync, path)
        while fd is None and time.monotonic() < deadline:
            await asyncio.sleep(self._poll)  # another process holds it: see the module docstring
            fd, _ = await asyncio.to_thread(try_lock_sync, path)
        if fd is None:
            log.info("another process held the lock of %s for %.1f s", key, within)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                await asyncio.to_thread(release_lock_sync, path, fd)
