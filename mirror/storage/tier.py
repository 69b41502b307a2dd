"""The local tier of an object store (``[storage] local_cache = "20GiB"``): a bounded copy of hot blobs on this
replica's local disk, served with sendfile instead of a GET from the bucket.

The copies live under ``--data-dir/blobs`` in the disk store's layout (``BlobStore.path``). The bucket stays the
truth: a copy is only ever the bytes of a verified object (a writer's temp file renamed once its object is
complete, or the object read back and checked against its digest), a hit still asks the bucket that the object
exists (``S3Store.size``) before the copy is sent, and removing an object drops its copy. Past the bound the least
recently served copies are removed.

Lookups run on the event loop and touch only the in-memory table; file work runs in threads (``*_sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

from mirror.oci.reference import Digest
from mirror.storage.blobs import BlobStore
from mirror.storage.writer import BlobWriter

log = logging.getLogger(__name__)


class LocalTier:
    """Copies of objects on local disk, at most ``bound`` bytes, least recently served dropped first."""

    def __init__(self, files: BlobStore, bound: int):
        self._files = files
        self.bound = bound
        self._copies: OrderedDict[Digest, int] = OrderedDict()  # digest -> size, least recently served first
        self.total = 0
        self._table = threading.Lock()  # the table only: the loop takes it for lookups, never across file work
        self._files_lock = threading.Lock()  # renames and removals of copies, one at a time (threads)
        self._filling: set[Digest] = set()

    # --- on the loop ------------------------------------------------------------------------------------------
    def copy(self, digest: Digest) -> Path | None:
        """The copy of ``digest`` (from now on its most recently served), or None."""
        with self._table:
            if digest not in self._copies:
                return None
            self._copies.move_to_end(digest)
        return self._files.path(digest)

    def wanted(self, digest: Digest, size: int) -> bool:
        """Whether reading ``digest`` from the bucket should fill a copy (it fits, is not held, not being filled);
        if so it counts as being filled from now on (``fill`` ends that)."""
        with self._table:
            if size > self.bound or digest in self._copies or digest in self._filling:
                return False
        self._filling.add(digest)
        return True

    async def fill(self, digest: Digest, chunks: AsyncIterator[bytes]) -> None:
        """A copy of ``digest`` from its object's bytes, verified against the digest before it is kept."""
        try:
            writer = await asyncio.to_thread(BlobWriter, self, digest.algorithm)
            try:
                async for chunk in chunks:
                    await writer.write(chunk)
            except BaseException:
                await writer.abort()
                raise
            await writer.commit(digest)  # a damaged object is DigestMismatch: no copy
        finally:
            self._filling.discard(digest)

    # --- what BlobWriter needs of its store (``writer.Publisher``): fills end in ``keep_sync`` -------------------
    @property
    def tmp_dir(self) -> Path:
        return self._files.tmp_dir

    async def publish_file(self, temp_path: Path, digest: Digest) -> None:
        size = await asyncio.to_thread(os.path.getsize, temp_path)
        if not await asyncio.to_thread(self.keep_sync, temp_path, digest, size):
            await asyncio.to_thread(temp_path.unlink, True)

    # --- in threads -------------------------------------------------------------------------------------------
    def keep_sync(self, temp_path: Path, digest: Digest, size: int) -> bool:
        """The verified, complete file of ``digest`` becomes its copy (renamed into place); False if it is larger
        than the bound (the caller removes it)."""
        if size > self.bound:
            return False
        with self._files_lock:
            self._files.publish_sync(temp_path, digest)
            with self._table:
                self.total += size - self._copies.pop(digest, 0)
                self._copies[digest] = size
        self._shrink_sync()
        return True

    def drop_sync(self, digest: Digest) -> None:
        """Remove the copy of ``digest`` (its object was deleted, evicted or quarantined)."""
        with self._files_lock:
            with self._table:
                size = self._copies.pop(digest, None)
                self.total -= size or 0
            if size is not None:
                self._remove(digest)

    def _shrink_sync(self) -> None:
        while True:
            with self._files_lock:
                with self._table:
                    if self.total <= self.bound or not self._copies:
                        return
                    digest, size = self._copies.popitem(last=False)
                    self.total -= size
                self._remove(digest)

    def _remove(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._files.path(digest).unlink()  # a client sending it keeps its open file

    def load_sync(self) -> None:
        """At start-up: the copies a previous run left, least recently written first, cut to the bound."""
        found = sorted((f for f in self._files.walk_sync() if f.key and f.size is not None), key=lambda f: f.mtime)
        with self._table:
            for item in found:
                digest = Digest.parse(item.key)
                self.total += (item.size or 0) - self._copies.pop(digest, 0)
                self._copies[digest] = item.size or 0
        self._shrink_sync()
        if found:
            log.info("local tier: %d copies (%d bytes) of at most %d bytes", len(self._copies), self.total, self.bound)
