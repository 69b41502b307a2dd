"""Push upload sessions on disk, so that an upload survives a restart of the mirror.

Layout (inside the data dir, next to ``blobs/``, so that completing an upload is one rename)::

    uploads/
      <uuid>/
        session.json    {"repo": "my/app", "started": 1700000000.0, "size": 1048576, "client": "192.0.2.7"},
                        rewritten (temp file + rename) after every acknowledged chunk; its mtime is the
                        session's last activity
        data            the bytes received so far; on completion verified and renamed into blobs/

``size`` is what the client was last told (the ``Range`` of its last 202). When a session is reopened after a
restart, ``data`` is cut back to ``size``: a chunk that was half-written when the mirror died is dropped, and the
client, which never got a 202 for it, sends it again from the offset it knows. Sessions idle longer than the
configured age are removed by ``sweep``.

Sessions are bounded: at most ``max_sessions`` in all and ``max_per_client`` per client address (``create``
raises ``TooManySessions`` past either), and the bytes they hold are reported through ``on_held`` so that the
usage table counts them against the cache's size (eviction sees them; ``sweep`` with a short age reclaims idle
sessions first when space is short).

A session's writer (``BlobWriter`` on ``data``) stays open between chunks while the mirror runs, so the digest is
computed while the bytes stream in; after a restart the writer re-hashes ``data`` once when it is reopened.

Processes sharing the data dir (``shared``) may each take requests of one session. Then:
- the requests on a session are applied one at a time across processes: an exclusive ``flock`` on
  ``<uuid>/lock`` (taken in a thread of the sessions' own, after the in-process lock), held from the reload of
  the record to the acknowledgement;
- a process's open writer is used only if this process wrote the last chunk (``session.json`` names the writer,
  and ``data`` holds exactly the acknowledged bytes); otherwise ``data`` is reopened and re-hashed, so the hash
  state and the offset come from the disk;
- the caps count the sessions of every process: ``create`` reads what every session holds under an ``flock``
  on ``uploads/.create.lock`` (a scan of the session records: at most ``max_sessions`` small files, per POST);
- ``sweep`` never removes a session whose lock another process holds (a chunk is arriving there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mirror.storage.sessionlocks import CREATE_LOCK, close_if_taken, flock_sync, held_elsewhere_sync
from mirror.storage.writer import BlobWriter, Publisher

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
    client: str = ""  # the address that opened it (sessions are capped per client)
    writer: str = ""  # the process that acknowledged the last chunk (processes sharing the data dir)

    @property
    def data_path(self) -> Path:
        return self.directory / "data"


def valid_uuid(text: str) -> bool:
    return bool(_UUID_RE.fullmatch(text))


class TooManySessions(Exception):
    """A new session would pass a cap: ``scope`` is "client" (this address holds ``limit``) or "total"."""

    def __init__(self, scope: str, limit: int):
        super().__init__(f"{limit} upload sessions are open {'from this client' if scope == 'client' else 'in all'}")
        self.scope = scope
        self.limit = limit


def _held_sync(directory: Path) -> tuple[str, int] | None:
    """(client, acknowledged size) from a session's record, or None if it has none."""
    try:
        record = json.loads((directory / "session.json").read_text())
        return str(record.get("client", "")), int(record["size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def held_sync(data_dir: Path) -> tuple[int, int]:
    """(sessions, bytes) the upload sessions under ``data_dir`` hold, read from disk (``mirror stats``)."""
    count = size = 0
    with contextlib.suppress(OSError):
        for entry in (data_dir / "uploads").iterdir():
            held = _held_sync(entry) if valid_uuid(entry.name) else None
            if held is not None:
                count += 1
                size += held[1]
    return count, size


class UploadSessions:
    """The sessions under ``<data-dir>/uploads``, their open writers and one lock each (chunks of one session
    are applied one at a time, in order)."""

    def __init__(
        self,
        data_dir: Path,
        store: Publisher,
        max_sessions: int = 1024,
        max_per_client: int = 64,
        shared: bool = False,
    ):
        self.root = data_dir / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self._store = store
        self.shared = shared  # other processes on the data dir take requests of the same sessions
        self._name = f"{os.getpid()}-{secrets.token_hex(4)}"  # this process, in ``session.json``
        # Waits for another process's session lock: its own threads, so that they never hold up file work.
        self._lock_waits: ThreadPoolExecutor | None = None
        self._writers: dict[str, BlobWriter] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        # uuid -> (client, acknowledged bytes) of every session, on the event loop; read from disk by ``sweep``.
        self._held: dict[str, tuple[str, int]] = {}
        self.on_held: Callable[[int, int], None] = lambda sessions, size: None  # the usage table's count

    # --- what the sessions hold ------------------------------------------------------------------------------
    def _hold(self, uuid: str, held: tuple[str, int] | None) -> None:
        if held is None:
            self._held.pop(uuid, None)
        else:
            self._held[uuid] = held
        self._report()

    def _report(self) -> None:
        self.on_held(len(self._held), sum(size for _, size in self._held.values()))

    def _reserve(self, client: str) -> str:
        """A new session's uuid, counted at once (before any await), or TooManySessions."""
        if len(self._held) >= self.max_sessions:
            raise TooManySessions("total", self.max_sessions)
        if sum(1 for owner, _ in self._held.values() if owner == client) >= self.max_per_client:
            raise TooManySessions("client", self.max_per_client)
        uuid = str(uuidlib.uuid4())
        self._hold(uuid, (client, 0))
        return uuid

    # --- records ---------------------------------------------------------------------------------------------
    def _save_sync(self, session: UploadSession) -> None:
        record = {
            "repo": session.repo,
            "started": session.started,
            "size": session.size,
            "client": session.client,
            "writer": session.writer,
        }
        temp = session.directory / "session.json.tmp"
        temp.write_text(json.dumps(record))
        os.replace(temp, session.directory / "session.json")

    def create_sync(self, repo: str, uuid: str, client: str = "", now: float | None = None) -> UploadSession:
        directory = self.root / uuid
        directory.mkdir()
        session = UploadSession(uuid, repo, time.time() if now is None else now, 0, directory, client)
        (directory / "data").touch()
        self._save_sync(session)
        return session

    async def create(self, repo: str, client: str = "") -> UploadSession:
        """A new session for ``client`` (its address), or TooManySessions past either cap."""
        if self.shared:
            return await self._create_shared(repo, client)
        uuid = self._reserve(client)
        try:
            return await asyncio.to_thread(self.create_sync, repo, uuid, client)
        except BaseException:
            self._hold(uuid, None)
            await asyncio.to_thread(shutil.rmtree, self.root / uuid, True)
            raise

    async def _create_shared(self, repo: str, client: str) -> UploadSession:
        """``create`` with the caps counted over the sessions of every process: what all of them hold is read
        from disk, under a lock that makes the check and the creation one step for all processes."""
        uuid = str(uuidlib.uuid4())
        session, held = await asyncio.to_thread(self._create_shared_sync, repo, uuid, client)
        self._held = held
        self._report()
        if session is None:
            scope = "total" if len(held) >= self.max_sessions else "client"
            raise TooManySessions(scope, self.max_sessions if scope == "total" else self.max_per_client)
        return session

    def _create_shared_sync(
        self, repo: str, uuid: str, client: str
    ) -> tuple[UploadSession | None, dict[str, tuple[str, int]]]:
        fd = flock_sync(self.root / CREATE_LOCK)  # held for one scan of the records by whoever creates a session
        try:
            held = {e.name: h for e in self.root.iterdir() if valid_uuid(e.name) and (h := _held_sync(e)) is not None}
            mine = sum(1 for owner, _ in held.values() if owner == client)
            if len(held) >= self.max_sessions or mine >= self.max_per_client:
                return None, held
            session = self.create_sync(repo, uuid, client)
            held[uuid] = (client, 0)
            return session, held
        finally:
            os.close(fd)

    def load_sync(self, uuid: str) -> UploadSession | None:
        if not valid_uuid(uuid):
            return None
        directory = self.root / uuid
        try:
            record = json.loads((directory / "session.json").read_text())
            return UploadSession(
                uuid,
                str(record["repo"]),
                float(record["started"]),
                int(record["size"]),
                directory,
                str(record.get("client", "")),
                str(record.get("writer", "")),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    async def load(self, uuid: str) -> UploadSession | None:
        return await asyncio.to_thread(self.load_sync, uuid)

    def exists_sync(self, uuid: str) -> bool:
        """Whether the session is on this data dir (blocking)."""
        return valid_uuid(uuid) and (self.root / uuid / "session.json").is_file()

    async def acknowledge(self, session: UploadSession, size: int) -> None:
        """Record that the client has been told ``size`` bytes are in (also marks the session as active)."""
        session.size = size
        session.writer = self._name
        await asyncio.to_thread(self._save_sync, session)
        if session.uuid in self._held:  # not removed meanwhile
            self._hold(session.uuid, (session.client, size))

    @contextlib.asynccontextmanager
    async def lock(self, uuid: str) -> AsyncIterator[None]:
        """Apply one request to the session at a time: in this process, and with ``shared`` in all of them."""
        lock = self._locks.get(uuid)
        if lock is None:
            lock = self._locks[uuid] = asyncio.Lock()
        async with lock:
            if not self.shared:
                yield
                return
            fd = await self._flock(uuid)
            try:
                yield
            finally:
                if fd >= 0:
                    await asyncio.to_thread(os.close, fd)  # releases the flock

    async def _flock(self, uuid: str) -> int:
        """The session's cross-process lock, waited for in a thread (-1 if the session is gone: the caller's
        reload of the record then finds no session). Released if this task is cancelled while it waits."""
        if self._lock_waits is None:
            self._lock_waits = ThreadPoolExecutor(8, thread_name_prefix="upload-lock")
        waiting = asyncio.get_running_loop().run_in_executor(self._lock_waits, flock_sync, self.root / uuid / "lock")
        try:
            return await asyncio.shield(waiting)
        except asyncio.CancelledError:
            waiting.add_done_callback(close_if_taken)
            raise

    def busy_elsewhere_sync(self, uuid: str) -> bool:
        """Another process holds the session's lock (a chunk is arriving there). Blocking: call it in a thread."""
        return held_elsewhere_sync(self.root / uuid / "lock")

    # --- writers ---------------------------------------------------------------------------------------------
    def _open_sync(self, session: UploadSession) -> BlobWriter:
        with open(session.data_path, "ab") as fh:  # creates it if a crash lost it; cuts an unacknowledged tail
            if fh.tell() > session.size:
                fh.truncate(session.size)
        writer = BlobWriter(self._store, "sha256", temp_path=session.data_path)
        session.size = writer.written
        return writer

    async def writer(self, session: UploadSession) -> BlobWriter:
        """The session's writer: the open one, or ``data`` reopened (after a restart, or when another process
        wrote the last chunk) and re-hashed."""
        writer = self._writers.get(session.uuid)
        if writer is not None and self.shared and not await asyncio.to_thread(self._current_sync, session, writer):
            await asyncio.to_thread(writer.detach_sync)
            writer = None
        if writer is None:
            writer = await asyncio.to_thread(self._open_sync, session)
            self._writers[session.uuid] = writer
        return writer

    def _current_sync(self, session: UploadSession, writer: BlobWriter) -> bool:
        """Our open writer still describes ``data``: we acknowledged the last chunk, and nothing was added since."""
        try:
            size = os.stat(session.data_path).st_size
        except FileNotFoundError:
            return False
        return session.writer == self._name and writer.written == session.size == size

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
        self._hold(uuid, None)

    # --- housekeeping ----------------------------------------------------------------------------------------
    def sweep_sync(
        self, max_age: float, now: float | None = None, busy: frozenset[str] = frozenset()
    ) -> tuple[list[str], dict[str, tuple[str, int]]]:
        """Remove sessions idle for more than ``max_age`` seconds (by the mtime of ``session.json``), and
        leftovers that are not sessions at all. ``busy`` sessions (a chunk is being received) are kept.
        Returns the removed names and what the remaining sessions hold."""
        now = time.time() if now is None else now
        removed = []
        kept: dict[str, tuple[str, int]] = {}
        for entry in self.root.iterdir():
            if entry.name in busy or entry.name == CREATE_LOCK:
                continue
            last: float | None
            try:
                last = (entry / "session.json").stat().st_mtime
            except OSError:
                # No record yet: a session being created (its directory comes just before its record, in another
                # thread or process), or what a crash left between the two. Aged by its directory.
                last = _mtime(entry) if valid_uuid(entry.name) and entry.is_dir() else None
            if last is None or not valid_uuid(entry.name) or now - last > max_age:
                if self.shared and valid_uuid(entry.name) and self.busy_elsewhere_sync(entry.name):
                    continue  # a chunk is arriving in another process
                if entry.is_dir():
                    self._remove_sync(entry.name)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
            elif (held := _held_sync(entry)) is not None:
                kept[entry.name] = held
        if removed:
            log.info("removed %d upload sessions idle for more than %.0f s", len(removed), max_age)
        return removed, kept

    async def sweep(self, max_age: float, now: float | None = None) -> list[str]:
        """Remove idle sessions (``sweep_sync``) and count what the others hold (sessions found on disk at start
        included; sessions created while the sweep ran keep their count)."""
        busy = frozenset(uuid for uuid, lock in self._locks.items() if lock.locked())
        removed, kept = await asyncio.to_thread(self.sweep_sync, max_age, now, busy)
        for uuid in removed:
            self._locks.pop(uuid, None)
            self._held.pop(uuid, None)
        for uuid, held in kept.items():
            self._held.setdefault(uuid, held)
        self._report()
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
        if self._lock_waits is not None:
            self._lock_waits.shutdown(wait=False, cancel_futures=True)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
