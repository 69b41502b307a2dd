"""Inbound credentials and who may do what: the access decision for every registry and admin request.

The policy is here: ``ACTIONS`` classifies each route by what it does, ``Access.check`` decides; the aiohttp
middleware that applies it to a request is ``api.access``. Its helpers: ``mirror.credentials`` (the htpasswd file,
bcrypt's executor, the brake on wrong passwords) and ``mirror.permissions`` (``[[access]]`` rules).

Off by default, as ``registry:2`` is: without ``--htpasswd`` anyone may pull (and use the admin API, when
``--admin-api`` turns it on), and pushes and deletes are accepted from loopback clients only
(``anonymous_push = "loopback"``), so a mirror listening on the network cannot be written to by whoever reaches
it. With an htpasswd file (``mirror.credentials``) and the built-in permissions:

| request                         | no credentials                          | valid credentials | wrong credentials |
|---------------------------------|-----------------------------------------|-------------------|-------------------|
| ``GET /v2/`` (login, ping)      | 401 + ``WWW-Authenticate: Basic``       | 200               | 401               |
| pull (manifests, blobs, tags)   | allowed if ``anonymous_pull``, else 401 | allowed           | 401               |
| push, delete                    | 401                                     | allowed           | 401               |
| ``/admin/v1/*``                 | 401                                     | allowed           | 401               |

``[[access]]`` rules (``mirror.permissions``) replace the built-in permissions: what they do not allow is a 401
with the Basic challenge for an anonymous client (so that it can log in) and 403 DENIED for a user.
``/v2/`` always challenges anonymous callers when an htpasswd file is set: Docker sends credentials only to a
registry whose ``/v2/`` asked for them, so this is what makes ``docker login`` and an authenticated push work.
``read_only`` refuses every push and delete with 405 UNSUPPORTED, whoever asks. An address sending wrong
passwords again and again, or a flood of them, gets 429 TOOMANYREQUESTS (``mirror.credentials``).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass

from mirror.credentials import BcryptPool, FailureBrake, Htpasswd, HtpasswdError, parse_htpasswd
from mirror.metrics import Metrics
from mirror.oci import errors
from mirror.permissions import Action, Permissions

__all__ = ["Access", "AccessSettings", "Action", "BcryptPool", "Htpasswd", "HtpasswdError", "parse_htpasswd"]
ANONYMOUS_PUSH = ("loopback", "any", "off")
# The brake on one client address: after this many failed logins within FAILURE_WINDOW seconds, 429 with
# Retry-After, without running bcrypt. Read when the Access is built.
FAILURES_ALLOWED = 5
FAILURE_WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class AccessSettings:
    anonymous_pull: bool = True  # with an htpasswd file: may clients without credentials pull?
    anonymous_push: str = "loopback"  # without an htpasswd file: who may push and delete (ANONYMOUS_PUSH)
    read_only: bool = False
    realm: str = "mirror"


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


# Route name (``api/routes.py``) -> what the request does. Routes not listed (/healthz, /metrics, unknown paths)
# are not checked.
ACTIONS = {
    "base": Action.PING,
    "base_noslash": Action.PING,
    "manifest": Action.PULL,
    "manifest_head": Action.PULL,
    "blob": Action.PULL,
    "blob_head": Action.PULL,
    "tags": Action.PULL,
    "referrers": Action.PULL,
    "catalog": Action.PULL,
    "upload_start": Action.PUSH,
    "upload": Action.PUSH,
    "manifest_put": Action.PUSH,
    "manifest_delete": Action.DELETE,
    "blob_delete": Action.DELETE,
    # The web page (``api.ui``; routed unless --ui off): whoever may pull may look.
    "ui_root": Action.PULL,
    "ui_noslash": Action.PULL,
    "ui_overview": Action.PULL,
    "ui_inflight": Action.PULL,
    "ui_script": Action.PULL,
    "ui_missing": Action.PULL,
    "ui_static": Action.PULL,
    "ui_repositories": Action.PULL,  # each name listed is checked too (``api.ui.repositories``)
    "ui_repository": Action.PULL,
    "ui_image": Action.PULL,
    "ui_upstreams": Action.PULL,
    "ui_login": Action.PING,  # asks anonymous callers for credentials, like /v2/
    # The page's actions (``api.ui.actions``; routed only with --admin-api): the admin API's grant.
    "ui_actions": Action.ADMIN,
    "ui_confirm": Action.ADMIN,
    "ui_act": Action.ADMIN,
    "ui_job": Action.ADMIN,
    "ui_job_json": Action.ADMIN,
    # The admin API (``api.admin``; routed only with --admin-api).
    "admin_stats": Action.ADMIN,
    "admin_ls": Action.ADMIN,
    "admin_pins": Action.ADMIN,
    "admin_pin": Action.ADMIN,
    "admin_unpin": Action.ADMIN,
    "admin_evict_plan": Action.ADMIN,
    "admin_evict": Action.ADMIN,
    "admin_gc": Action.ADMIN,
    "admin_verify": Action.ADMIN,
    "admin_prefetch": Action.ADMIN,
    # The replicas' internal endpoint (``api.peer``; routed only with [cluster]): its own check, the secret.
    "peer_fetch": Action.PEER,
    "peer_upload": Action.PEER,
    "admin_cluster": Action.ADMIN,
}
WHAT = {
    Action.PEER: "stream",
    Action.PING: "log in",
    Action.PULL: "pull",
    Action.PUSH: "push",
    Action.DELETE: "delete",
    Action.ADMIN: "use",
}


class Access:
    """The access decision for one request: the actor's name (None for anonymous), or a registry error."""

    def __init__(
        self,
        settings: AccessSettings,
        htpasswd: Htpasswd | None,
        metrics: Metrics,
        permissions: Permissions | None = None,
    ):
        self.settings = settings
        self.htpasswd = htpasswd
        self.permissions = permissions or Permissions.default(settings.anonymous_pull)
        self.brake = FailureBrake(FAILURES_ALLOWED, FAILURE_WINDOW)
        self._metrics = metrics
        self._challenge = {"WWW-Authenticate": f'Basic realm="{settings.realm}"'}

    def _unauthorized(self, message: str) -> errors.RegistryError:
        self._metrics.auth_requests.labels("unauthorized").inc()
        return errors.Unauthorized(message, headers=dict(self._challenge))

    async def check(
        self, action: Action, authorization: str | None, peer: str | None, name: str | None = None
    ) -> str | None:
        """``name``: the repository as the client named it (see ``mirror.permissions``), None for requests about
        no single repository (``/v2/``, ``_catalog``, the admin API)."""
        if action is Action.PEER:
            return None  # another replica: checked against the cluster secret by its handler (api.peer)
        writes = action in (Action.PUSH, Action.DELETE)
        if writes and self.settings.read_only:
            self._metrics.auth_requests.labels("read_only").inc()
            raise errors.Unsupported("the registry is in read-only mode: pushes and deletes are refused")
        if self.htpasswd is None:
            self._check_open(action, peer)
            return None
        actor = await self._authenticate(self.htpasswd, authorization, peer)
        if self.permissions.allows(actor, action, name):
            self._metrics.auth_requests.labels("anonymous" if actor is None else "authenticated").inc()
            return actor
        target = "the admin API" if action is Action.ADMIN else (name or "")
        if actor is None:
            raise self._unauthorized(f"authentication required to {WHAT[action]} {target}".rstrip())
        self._metrics.auth_requests.labels("denied").inc()
        raise errors.Denied(f"{actor} may not {WHAT[action]} {target}".rstrip(), detail={"user": actor})

    async def _authenticate(self, htpasswd: Htpasswd, authorization: str | None, peer: str | None) -> str | None:
        """The user whose credentials came with the request, None when none came; wrong ones are a 401, and an
        address that keeps sending wrong ones is braked (429) before bcrypt runs."""
        try:
            credentials = parse_basic(authorization)
        except errors.RegistryError as exc:
            raise self._unauthorized(exc.message) from None
        if credentials is None:
            return None
        user, password = credentials
        try:
            self.brake.check(peer)
            verified = await htpasswd.verify(user, password)
        except errors.TooManyRequests:
            self._metrics.auth_requests.labels("throttled").inc()
            raise
        if not verified:
            self.brake.failed(peer)
            raise self._unauthorized("wrong user name or password")
        return user

    def may(self, actor: str | None, action: Action, name: str) -> bool:
        """For listings: whether the actor of an admitted request may ``action`` the repository ``name``."""
        return self.htpasswd is None or self.permissions.allows(actor, action, name)

    def close(self) -> None:
        if self.htpasswd is not None:
            self.htpasswd.close()

    def _check_open(self, action: Action, peer: str | None) -> None:
        """No htpasswd file: pulls (and the admin API, when it is on) are open; writes follow ``anonymous_push``."""
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
