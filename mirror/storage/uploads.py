"""Push upload sessions on disk, so that an upload survives a restart of the mirror.

Layout (inside the data dir, next to ``blobs/``, so that completing an upload is one rename)::

    uploads/
      <uuid>/
        session.json    {"repo": "my/app", "started": 1700000000.0, "size": 1048576}, rewritten (temp file +
                        rename) after every acknowledged chunk; its mtime is the session's last activity
        data            the bytes received so far; on completion verified and renamed into blobs/

``size`` is what the client was last told (the ``Range`` of its last 202). When a session is reopened after a
restart, ``data`` is cut back to ``size``: a chunk that was half-written when the mirror died is dropped, and the
client, which never got a 202 for it, sends it again from the offset it knows. Sessions idle longer than the
configured age are removed by ``sweep``.

A session's writer (``BlobWriter`` on ``data``) stays open between chunks while the mirror runs, so the digest is
computed while the bytes stream in; after a restart the writer re-hashes ``data`` once when it is reopened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from mirror.storage.blobs import BlobStore, BlobWriter

log = logging.getLogger(__name__)
# Only ids the mirror itself hands out (uuid4, lower case) are ever turned into paths.
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@dataclass(slots=True)
class UploadSession:
    uuid: str
    repo: str  # the local repository the upload belongs to
    started: float
    size: int  # bytes acknowledged to the client
    directory: Path

    @property
    def data_path(self) -> Path:
        return self.directory / "data"


def valid_uuid(text: str) -> bool:
    return bool(_UUID_RE.fullmatch(text))


class UploadSessions:
    """The sessions under ``<data-dir>/uploads``, their open writers and one lock each (chunks of one session
    are applied one at a time, in order)."""

    def __init__(self, data_dir: Path, store: BlobStore):
        self.root = data_dir / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self._store = store
        self._writers: dict[str, BlobWriter] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # --- records ---------------------------------------------------------------------------------------------
    def _save_sync(self, session: UploadSession) -> None:
        record = {"repo": session.repo, "started": session.started, "size": session.size}
        temp = session.directory / "session.json.tmp"
        temp.write_text(json.dumps(record))
        os.replace(temp, session.directory / "session.json")

    def create_sync(self, repo: str, now: float | None = None) -> UploadSession:
        uuid = str(uuidlib.uuid4())
        directory = self.root / uuid
        directory.mkdir()
        session = UploadSession(uuid, repo, time.time() if now is None else now, 0, directory)
        (directory / "data").touch()
        self._save_sync(session)
        return session

    async def create(self, repo: str) -> UploadSession:
        return await asyncio.to_thread(self.create_sync, repo)

    def load_sync(self, uuid: str) -> UploadSession | None:
        if not valid_uuid(uuid):
            return None
        directory = self.root / uuid
        try:
            record = json.loads((directory / "session.json").read_text())
            return UploadSession(uuid, str(record["repo"]), float(record["started"]), int(record["size"]), directory)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def load(self, uuid: str) -> UploadSession | None:
        return await asyncio.to_thread(self.load_sync, uuid)

    async def acknowledge(self, session: UploadSession, size: int) -> None:
        """Record that the client has been told ``size`` bytes are in (also marks the session as active)."""
        session.size = size
        await asyncio.to_thread(self._save_sync, session)

    def lock(self, uuid: str) -> asyncio.Lock:
        lock = self._locks.get(uuid)
        if lock is None:
            lock = self._locks[uuid] = asyncio.Lock()
        return lock

    # --- writers ---------------------------------------------------------------------------------------------
    def _open_sync(self, session: UploadSession) -> BlobWriter:
        with open(session.data_path, "ab") as fh:  # creates it if a crash lost it; cuts an unacknowledged tail
            if fh.tell() > session.size:
                fh.truncate(session.size)
        writer = BlobWriter(self._store, "sha256", temp_path=session.data_path)
        session.size = writer.written
        return writer

    async def writer(self, session: UploadSession) -> BlobWriter:
        """The session's writer: the open one, or ``data`` reopened (after a restart) and re-hashed."""
        writer = self._writers.get(session.uuid)
        if writer is None:
            writer = await asyncio.to_thread(self._open_sync, session)
            self._writers[session.uuid] = writer
        return writer

    def forget_writer(self, uuid: str) -> None:
        """The writer was committed or aborted by its user: it is no longer this session's."""
        self._writers.pop(uuid, None)

    def _remove_sync(self, uuid: str) -> None:
        writer = self._writers.pop(uuid, None)
        if writer is not None:
            writer.detach_sync()
        shutil.rmtree(self.root / uuid, ignore_errors=True)

    async def remove(self, uuid: str) -> None:
        """Drop a session and whatever it holds (cancelled, completed, failed or abandoned)."""
        await asyncio.to_thread(self._remove_sync, uuid)
        self._locks.pop(uuid, None)

    # --- housekeeping ----------------------------------------------------------------------------------------
    def sweep_sync(self, max_age: float, now: float | None = None, busy: frozenset[str] = frozenset()) -> list[str]:
        """Remove sessions idle for more than ``max_age`` seconds (by the mtime of ``session.json``), and
        leftovers that are not sessions at all. ``busy`` sessions (a chunk is being received) are kept."""
        now = time.time() if now is None else now
        removed = []
        for entry in self.root.iterdir():
            if entry.name in busy:
                continue
            try:
                last = (entry / "session.json").stat().st_mtime
            except OSError:
                last = None
            if last is None or not valid_uuid(entry.name) or now - last > max_age:
                if entry.is_dir():
                    self._remove_sync(entry.name)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
        if removed:
            log.info("removed %d abandoned upload sessions", len(removed))
        return removed

    async def sweep(self, max_age: float, now: float | None = None) -> list[str]:
        busy = frozenset(uuid for uuid, lock in self._locks.items() if lock.locked())
        removed = await asyncio.to_thread(self.sweep_sync, max_age, now, busy)
        for uuid in removed:
            self._locks.pop(uuid, None)
        return removed

    def count_sync(self) -> int:
        with contextlib.suppress(OSError):
            return sum(1 for _ in self.root.iterdir())
        return 0

    def close(self) -> None:
        """Release open files at shutdown; the sessions stay on disk and resume after a restart."""
        for writer in self._writers.values():
            writer.detach_sync()
        self._writers.clear()
