"""Inbound credentials: the htpasswd file (bcrypt, as ``htpasswd -B`` writes it), the executor bcrypt runs on,
and the brake on addresses that keep sending wrong passwords.

bcrypt is deliberately slow (a quarter of a second at cost 12), so three things keep a flood of wrong passwords
from hurting anyone else or from telling an attacker which user names exist:

- every check runs on ``BcryptPool``: its own few threads and a bounded queue of waiting checks, so the default
  thread pool that cache hits use for file and index work is never filled with password checks; past the bound
  a check is refused at once (429 TOOMANYREQUESTS) instead of waiting;
- an unknown user name is checked against a dummy hash of the cost most entries have, so it costs the same time
  as a wrong password of a known user;
- ``FailureBrake``: an address with ``allowed`` failures within ``window`` seconds gets 429 with ``Retry-After``
  without running bcrypt (a bounded table of addresses, least recently seen dropped first).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt

from mirror.oci import errors

log = logging.getLogger(__name__)
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
VERIFIED_TTL = 300.0  # seconds a verified (user, password) pair is trusted without running bcrypt again
VERIFIED_MAX = 4096
RELOAD_INTERVAL = 2.0  # seconds between checks of the htpasswd file's mtime
BCRYPT_THREADS = 2  # at most this many bcrypt checks run at once...
BCRYPT_QUEUE = 16  # ...and at most this many wait; more are refused with 429 at once
BRAKE_ADDRESSES = 4096  # client addresses whose recent failures are remembered


class HtpasswdError(Exception):
    """The htpasswd file cannot be read or holds no usable (bcrypt) entry."""


def parse_htpasswd(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    """``user:hash`` lines; only bcrypt hashes are accepted (what ``htpasswd -B`` writes, and all Distribution
    accepts). Other entries are skipped with a warning naming the user."""
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            log.warning("%s line %d is not user:hash; skipped", source, number)
            continue
        if not hashed.startswith(BCRYPT_PREFIXES):
            log.warning("%s: the entry of %r is not bcrypt; recreate it with htpasswd -B", source, user)
            continue
        users[user] = hashed.encode()
    return users


def dummy_hash(users: dict[str, bytes]) -> bytes:
    """A hash no password matches, at the cost most entries have: ``$2b$<cost>$`` + a fresh salt, then the hash
    part of a real entry (bcrypt reads the cost and salt from the first 29 characters and compares the rest)."""
    costs = Counter(hashed[4:6] for hashed in users.values() if hashed[4:6].isdigit())
    cost = int(costs.most_common(1)[0][0]) if costs else 12
    return bcrypt.gensalt(rounds=min(max(cost, 4), 31)) + next(iter(users.values()))[29:]


class BcryptPool:
    """bcrypt checks on their own threads, with a bounded number running or waiting."""

    def __init__(self, threads: int = BCRYPT_THREADS, queue: int = BCRYPT_QUEUE):
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="bcrypt")
        # Released when the check ends in its thread, not when the awaiting request goes away: the bound is on
        # the work really queued.
        self._slots = threading.BoundedSemaphore(threads + queue)

    async def check(self, secret: bytes, hashed: bytes) -> bool:
        if not self._slots.acquire(blocking=False):
            raise errors.TooManyRequests(
                "too many password checks at once; retry in a moment", headers={"Retry-After": "1"}
            )
        try:
            future = self._executor.submit(bcrypt.checkpw, secret, hashed)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class FailureBrake:
    """Recent failed logins per client address; ``check`` refuses an address that reached ``allowed``."""

    def __init__(self, allowed: int, window: float, size: int = BRAKE_ADDRESSES):
        self.allowed, self.window, self.size = allowed, window, size
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, peer: str, now: float) -> deque[float] | None:
        times = self._failures.get(peer)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[peer]
            return None
        return times

    def check(self, peer: str | None) -> None:
        now = time.monotonic()
        times = self._recent(peer or "", now)
        if times is not None and len(times) >= self.allowed:
            retry = max(1, math.ceil(times[-self.allowed] + self.window - now))
            raise errors.TooManyRequests(
                f"too many failed logins from this address; retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )

    def failed(self, peer: str | None) -> None:
        key = peer or ""
        times = self._failures.setdefault(key, deque(maxlen=max(self.allowed, 1)))
        times.append(time.monotonic())
        self._failures.move_to_end(key)
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)


class Htpasswd:
    """An htpasswd file, re-read when it changes, and a short memory of verified passwords: Docker sends Basic
    credentials with every request, and bcrypt is deliberately slow."""

    def __init__(self, path: Path, pool: BcryptPool | None = None):
        self.path = path
        self.pool = pool or BcryptPool()
        self._users: dict[str, bytes] = {}
        self._dummy = b""
        self._mtime = 0.0
        self._checked = 0.0
        self._key = secrets.token_bytes(32)
        self._verified: dict[tuple[str, bytes, bytes], float] = {}
        self._load_sync()

    def _load_sync(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
            users = parse_htpasswd(self.path.read_text(), str(self.path))
        except (OSError, UnicodeDecodeError) as exc:
            raise HtpasswdError(f"cannot read htpasswd file {self.path}: {exc}") from exc
        if not users:
            raise HtpasswdError(f"htpasswd file {self.path} has no bcrypt entries (create them with htpasswd -B)")
        self._users, self._dummy, self._mtime = users, dummy_hash(users), mtime
        self._verified.clear()

    def _reload_sync(self) -> None:
        try:
            if os.stat(self.path).st_mtime != self._mtime:
                self._load_sync()
                log.info("re-read htpasswd file %s: %d users", self.path, len(self._users))
        except (OSError, HtpasswdError) as exc:
            log.error("keeping the previous users: %s", exc)

    async def verify(self, user: str, password: str) -> bool:
        """Whether the password is the user's. An unknown user costs one bcrypt check too (the dummy hash)."""
        now = time.monotonic()
        if now - self._checked > RELOAD_INTERVAL:
            self._checked = now
            await asyncio.to_thread(self._reload_sync)
        secret = password.encode()
        if len(secret) > 72:  # bcrypt looks at 72 bytes at most; longer is never a match (whoever the user)
            return False
        hashed = self._users.get(user)
        if hashed is None:
            await self.pool.check(secret, self._dummy)
            return False
        key = (user, hashed, hmac.new(self._key, secret, hashlib.sha256).digest())
        until = self._verified.get(key)
        if until is not None and until > now:
            return True
        if not await self.pool.check(secret, hashed):
            return False
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[key] = now + VERIFIED_TTL
        return True

    def close(self) -> None:
        self.pool.close()
