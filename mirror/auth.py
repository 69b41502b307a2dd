"""Who may do what: htpasswd credentials (bcrypt, as ``htpasswd -B`` writes them) and the access policy.

Off by default, as ``registry:2`` is: without ``--htpasswd`` anyone may pull, and pushes and deletes are accepted
from loopback clients only (``anonymous_push = "loopback"``), so a mirror listening on the network cannot be
written to by whoever reaches it. With an htpasswd file:

| request                         | no credentials                         | valid credentials | wrong credentials |
|---------------------------------|----------------------------------------|-------------------|-------------------|
| ``GET /v2/`` (login, ping)      | 401 + ``WWW-Authenticate: Basic``      | 200               | 401               |
| pull (manifests, blobs, tags)   | allowed if ``anonymous_pull``, else 401 | allowed           | 401               |
| push, delete                    | 401                                    | allowed           | 401               |

``/v2/`` always challenges anonymous callers when an htpasswd file is set: Docker sends credentials only to a
registry whose ``/v2/`` asked for them, so this is what makes ``docker login`` and an authenticated push work.
``read_only`` refuses every push and delete with 405 UNSUPPORTED, whoever asks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import bcrypt

from mirror.metrics import Metrics
from mirror.oci import errors

log = logging.getLogger(__name__)
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
VERIFIED_TTL = 300.0  # seconds a verified (user, password) pair is trusted without running bcrypt again
VERIFIED_MAX = 4096
RELOAD_INTERVAL = 2.0  # seconds between checks of the htpasswd file's mtime


class Action(StrEnum):
    PING = "ping"  # GET /v2/
    PULL = "pull"
    PUSH = "push"
    DELETE = "delete"


ANONYMOUS_PUSH = ("loopback", "any", "off")


@dataclass(frozen=True, slots=True)
class AccessSettings:
    anonymous_pull: bool = True  # with an htpasswd file: may clients without credentials pull?
    anonymous_push: str = "loopback"  # without an htpasswd file: who may push and delete (ANONYMOUS_PUSH)
    read_only: bool = False
    realm: str = "mirror"


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


class Htpasswd:
    """An htpasswd file, re-read when it changes, and a short memory of verified passwords: Docker sends Basic
    credentials with every request, and bcrypt is deliberately slow."""

    def __init__(self, path: Path):
        self.path = path
        self._users: dict[str, bytes] = {}
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
        self._users, self._mtime = users, mtime
        self._verified.clear()

    def _reload_sync(self) -> None:
        try:
            if os.stat(self.path).st_mtime != self._mtime:
                self._load_sync()
                log.info("re-read htpasswd file %s: %d users", self.path, len(self._users))
        except (OSError, HtpasswdError) as exc:
            log.error("keeping the previous users: %s", exc)

    async def verify(self, user: str, password: str) -> bool:
        now = time.monotonic()
        if now - self._checked > RELOAD_INTERVAL:
            self._checked = now
            await asyncio.to_thread(self._reload_sync)
        hashed = self._users.get(user)
        secret = password.encode()
        if hashed is None or len(secret) > 72:  # bcrypt looks at 72 bytes at most; longer is never a match
            return False
        key = (user, hashed, hmac.new(self._key, secret, hashlib.sha256).digest())
        until = self._verified.get(key)
        if until is not None and until > now:
            return True
        if not await asyncio.to_thread(bcrypt.checkpw, secret, hashed):
            return False
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[key] = now + VERIFIED_TTL
        return True


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``Authorization: Basic base64(user:password)`` -> (user, password); None when absent or empty (podman
    sends empty credentials to a registry it has none for: that is anonymous). Malformed -> UNAUTHORIZED."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise errors.Unauthorized("only Basic authentication is supported")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise errors.Unauthorized("malformed Basic credentials") from None
    user, _, password = decoded.partition(":")
    if not user and not password:
        return None
    return user, password


def is_loopback(peer: str | None) -> bool:
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class Access:
    """The access decision for one request: the actor's name (None for anonymous), or a registry error."""

    def __init__(self, settings: AccessSettings, htpasswd: Htpasswd | None, metrics: Metrics):
        self.settings = settings
        self.htpasswd = htpasswd
        self._metrics = metrics
        self._challenge = {"WWW-Authenticate": f'Basic realm="{settings.realm}"'}

    def _unauthorized(self, message: str) -> errors.RegistryError:
        self._metrics.auth_requests.labels("unauthorized").inc()
        return errors.Unauthorized(message, headers=dict(self._challenge))

    async def check(self, action: Action, authorization: str | None, peer: str | None) -> str | None:
        writes = action in (Action.PUSH, Action.DELETE)
        if writes and self.settings.read_only:
            self._metrics.auth_requests.labels("read_only").inc()
            raise errors.Unsupported("the registry is in read-only mode: pushes and deletes are refused")
        if self.htpasswd is None:
            self._check_open(action, peer)
            return None
        try:
            credentials = parse_basic(authorization)
        except errors.RegistryError as exc:
            raise self._unauthorized(exc.message) from None
        if credentials is not None:
            user, password = credentials
            if not await self.htpasswd.verify(user, password):
                raise self._unauthorized("wrong user name or password")
            self._metrics.auth_requests.labels("authenticated").inc()
            return user
        if action is Action.PULL and self.settings.anonymous_pull:
            self._metrics.auth_requests.labels("anonymous").inc()
            return None
        what = {Action.PING: "log in", Action.PULL: "pull", Action.PUSH: "push", Action.DELETE: "delete"}[action]
        raise self._unauthorized(f"authentication required to {what}")

    def _check_open(self, action: Action, peer: str | None) -> None:
        """No htpasswd file: pulls are open; writes follow ``anonymous_push``."""
        mode = self.settings.anonymous_push
        if action in (Action.PUSH, Action.DELETE) and not (mode == "any" or (mode == "loopback" and is_loopback(peer))):
            self._metrics.auth_requests.labels("denied").inc()
            raise errors.Denied(
                "this mirror accepts unauthenticated pushes and deletes from its own host only: configure "
                "--htpasswd for users on the network (or --anonymous-push any to accept them from anyone)"
                if mode == "loopback"
                else "pushes and deletes are disabled without authentication: configure --htpasswd",
                detail={"peer": peer},
            )
        self._metrics.auth_requests.labels("anonymous").inc()
