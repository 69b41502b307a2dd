"""Locks of upstream fetches across processes sharing one data dir: the file side of ``pull.filelock``.

Every fetch has a key (``BlobStore.fetch_key``: digest and upstream) and two files in ``tmp/``::

    lock-<key>    exclusive ``flock`` of whoever fetches it; the kernel releases it when that process dies. Once
                  the upstream answered, the holder writes "<size or -> <inode of the temp file> <registry>
                  <digest> <wall-clock start> <repository>" into it (the four after the inode for the web page's
                  list), and once the digest is verified, before it publishes, it adds " v" to that line
    fetch-<key>   the temp file the holder writes (``BlobStore.fetch_writer``), renamed into ``blobs/`` when
                  verified, removed when the fetch fails

Rules that make the outcome readable from the files alone:
- The holder publishes or removes the temp file *before* it releases the lock, so whoever takes the lock next
  finds either the published blob (success) or no blob (failure); a temp file found then is a dead holder's
  leftover: the new holder continues it (a follower that streamed it, ``left_behind_sync``) or removes it.
- The holder removes the lock file before it releases the lock. A lock is taken on an open file and is valid
  only if that file is still the one at the path (same inode); otherwise it is dropped and taken again, so two
  processes can never both hold a key.
- Nothing else removes lock files (``BlobStore.sweep_tmp_sync`` leaves them alone).

Every method blocks (file work, never a wait for the lock: ``LOCK_NB``): call them in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mirror.oci import errors
from mirror.oci.reference import Digest
from mirror.storage.blobs import LOCK_PREFIX, BlobStore

log = logging.getLogger(__name__)


ANNOUNCEMENT_MAX = 1024  # bytes of a lock file read: the fields above, a repository name included
VERIFIED = "v"  # the announcement's last field once the holder verified the digest


def _size_and_inode(announcement: str) -> tuple[int | None, int] | None:
    """The size (None: not announced) and the temp file's inode of an announcement, or None if it has none."""
    fields = announcement.split()
    if len(fields) < 2 or not fields[1].isdigit() or not (fields[0] == "-" or fields[0].isdigit()):
        return None
    return (None if fields[0] == "-" else int(fields[0])), int(fields[1])


@dataclass(frozen=True, slots=True)
class HeldFetch:
    """A fetch some process holds the lock of, as its announcement and its temp file show it."""

    registry: str
    digest: Digest
    repo: str
    size: int | None
    written: int
    started: float  # wall clock


@dataclass(frozen=True, slots=True)
class Progress:
    """A fetch another process holds, as its files show it."""

    announced: bool  # the holder's upstream answered (size and temp file known)
    size: int | None  # the upstream's Content-Length
    inode: int | None  # the temp file the holder writes
    written: int  # bytes in that temp file now
    verified: bool = False  # the holder checked the digest of every byte (it is publishing the file)


class Followed:
    """The temp file a follower streams, held open: its inode cannot be reused for another file meanwhile, so
    comparing inodes tells reliably whether the file at the path (or the one published) is still this one."""

    def __init__(self, fd: int, inode: int):
        self._fd = fd
        self.inode = inode

    def written_sync(self) -> int:
        return os.fstat(self._fd).st_size

    def close_sync(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True, slots=True)
class Published:
    size: int
    inode: int


class FetchLock:
    """The held lock of one fetch. ``release_sync`` drops it (also when the fetch failed)."""

    def __init__(self, fd: int, lock_path: Path, temp_path: Path, final_path: Path, key: str = "- -"):
        self._fd = fd
        self.lock_path = lock_path
        self.temp_path = temp_path
        self.final_path = final_path
        self._key = key  # "<registry> <digest>", for the announcement
        self._line = ""  # the announcement written

    def published_sync(self) -> Published | None:
        """The published blob, if a holder before us (or we) published it."""
        try:
            st = os.stat(self.final_path)
        except FileNotFoundError:
            return None
        return Published(st.st_size, st.st_ino)

    def left_behind_sync(self, inode: int) -> bool:
        """Whether the temp file of ``inode`` is still at the key's path: with the lock free, its holder died
        mid-blob and its bytes are there to be continued."""
        try:
            return os.stat(self.temp_path).st_ino == inode
        except FileNotFoundError:
            return False

    def discard_leftover_sync(self) -> None:
        """Remove a temp file left by a holder that died (we hold the key: nobody writes it)."""
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()

    def announce_sync(self, size: int | None, repo: str = "") -> None:
        """Tell followers the upstream answered: its size and which temp file holds the bytes (and, for the web
        page, what is fetched, since when, for which repository)."""
        inode = os.stat(self.temp_path).st_ino
        self._line = f"{'-' if size is None else size} {inode} {self._key} {time.time():.3f} {repo or '-'}"
        self._write(self._line)

    def announce_verified_sync(self) -> None:
        """Tell followers the digest of the temp file's bytes matched: their clients may have the last byte
        while this process publishes the file (an fsync, a rename)."""
        if self._line:
            self._write(f"{self._line} {VERIFIED}")

    def _write(self, line: str) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{line}\n".encode()[:ANNOUNCEMENT_MAX], 0)

    def release_sync(self) -> None:
        if self._fd < 0:
            return
        release_lock_sync(self.lock_path, self._fd)
        self._fd = -1


def try_lock_sync(lock_path: Path) -> tuple[int | None, str]:
    """Take the lock at ``lock_path`` without waiting: (fd, "") when taken, else (None, the holder's announcement).
    A lock taken on a file that its holder removed meanwhile (on release) is dropped and taken on the one there."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, ANNOUNCEMENT_MAX, 0).decode(errors="replace")
            os.close(fd)
            return None, text
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = -1
        if current == os.fstat(fd).st_ino:
            return fd, ""
        os.close(fd)  # its holder removed that file on release: take the lock on the one there now


def release_lock_sync(lock_path: Path, fd: int) -> None:
    """Let go of a lock ``try_lock_sync`` took: its file is removed first, then closed (which releases it)."""
    with contextlib.suppress(FileNotFoundError):
        lock_path.unlink()
    os.close(fd)


class FetchLocks:
    """The fetch locks of one store's ``tmp/``."""

    def __init__(self, store: BlobStore):
        self._store = store

    def _paths(self, registry: str, digest: Digest) -> tuple[Path, Path]:
        key = self._store.fetch_key(registry, digest)
        return self._store.tmp_dir / f"{LOCK_PREFIX}{key}", self._store.fetch_temp_path(registry, digest)

    def temp_path(self, registry: str, digest: Digest) -> Path:
        return self._store.fetch_temp_path(registry, digest)

    def acquire_sync(self, registry: str, digest: Digest) -> FetchLock | None:
        """The key's lock if nobody holds it (a leftover temp file is removed then), else None."""
        lock_path, temp_path = self._paths(registry, digest)
        fd, _ = self._try(lock_path)
        if fd is None:
            return None
        lock = FetchLock(fd, lock_path, temp_path, self._store.path(digest), f"{registry} {digest}")
        lock.discard_leftover_sync()
        return lock

    def follow_sync(self, registry: str, digest: Digest, inode: int) -> Followed | None:
        """Open the announced temp file to follow it; None if the file there is not (or no longer) that one."""
        try:
            fd = os.open(self._store.fetch_temp_path(registry, digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_ino != inode:
            os.close(fd)
            return None
        return Followed(fd, inode)

    def progress_sync(self, registry: str, digest: Digest, followed: Followed | None = None) -> FetchLock | Progress:
        """The key's lock if its holder released it (or died), else how far the holder's fetch is: the bytes in
        ``followed`` when the announcement still names it."""
        lock_path, temp_path = self._paths(registry, digest)
        fd, announcement = self._try(lock_path)
        if fd is not None:
            return FetchLock(fd, lock_path, temp_path, self._store.path(digest), f"{registry} {digest}")
        announced = _size_and_inode(announcement)
        if announced is None:
            return Progress(False, None, None, 0)
        size, inode = announced
        written = followed.written_sync() if followed is not None and followed.inode == inode else 0
        return Progress(True, size, inode, written, announcement.split()[6:7] == [VERIFIED])

    def announced_sync(self, registry: str, digest: Digest) -> int | None:
        """The size in the announcement of the key's fetch while some process holds its lock; None when nobody
        holds it (a dead holder's announcement stays in the file), or none or no size was announced. The lock is
        tested with a shared lock taken and dropped at once: a process trying to lead meanwhile follows instead,
        and takes the lock at its next look."""
        lock_path, _ = self._paths(registry, digest)
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            announced = _size_and_inode(os.pread(fd, ANNOUNCEMENT_MAX, 0).decode(errors="replace"))
            return announced[0] if announced is not None else None
        finally:
            os.close(fd)  # (drops the shared lock if it was taken)
        return None

    def held_sync(self, limit: int = 100) -> list[HeldFetch]:
        """The announced fetches whose lock some process holds (this one's too), at most ``limit``: the web page's
        list of what the processes on the data dir fetch now. Each lock is tested as ``announced_sync`` does."""
        found: list[HeldFetch] = []
        for path in self._store.tmp_dir.glob(f"{LOCK_PREFIX}*"):
            if len(found) >= limit:
                break
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held = self._held(os.pread(fd, ANNOUNCEMENT_MAX, 0).decode(errors="replace"))
                if held is not None:
                    found.append(held)
            finally:
                os.close(fd)
        return found

    def _held(self, announcement: str) -> HeldFetch | None:
        announced, fields = _size_and_inode(announcement), announcement.split()
        if announced is None or len(fields) < 6:
            return None
        try:
            digest, started = Digest.parse(fields[3]), float(fields[4])
        except (ValueError, errors.DigestInvalid):
            return None
        try:
            written = os.stat(self._store.fetch_temp_path(fields[2], digest)).st_size
        except FileNotFoundError:
            return None
        repo = "" if fields[5] == "-" else fields[5]
        return HeldFetch(fields[2], digest, repo, announced[0], written, started)

    def _try(self, lock_path: Path) -> tuple[int | None, str]:
        return try_lock_sync(lock_path)

    def clean_sync(self) -> int:
        """At start-up: remove the temp files of fetches nobody holds (their process died), leaving those of
        fetches other processes run; how many went."""
        removed = 0
        for entry in os.scandir(self._store.tmp_dir):
            if not entry.name.startswith(LOCK_PREFIX):
                continue
            fd, _ = self._try(Path(entry.path))
            if fd is None:
                continue
            key = entry.name[len(LOCK_PREFIX) :]
            lock = FetchLock(fd, Path(entry.path), self._store.tmp_dir / f"fetch-{key}", Path(os.devnull))
            with contextlib.suppress(FileNotFoundError):
                lock.temp_path.unlink()
                removed += 1
            lock.release_sync()
        if removed:
            log.info("removed %d temp files of interrupted fetches", removed)
        return removed
