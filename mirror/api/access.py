"""The access middleware: every registry and admin request is classified (ping, pull, push, delete, admin) by its
route and checked against the access policy (``mirror.auth``), with the repository name the client used, before
its handler runs. A refused push leaves nothing behind: the check comes before the handler reads a byte of the
body."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.keys import ACCESS
from mirror.permissions import Action

# The actor (user name) of an authenticated request, or None; the notifications report it.
ACTOR: web.RequestKey[str | None] = web.RequestKey("actor", str)

# Route name -> what the request does. Routes not listed (/healthz, /metrics, unknown paths) are not checked.
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
}


def repository_name(request: web.Request) -> str | None:
    """The repository as the client named it, which is what permission rules match: the path's ``<name>``, after
    containerd's ``?ns=<host>`` when there is one (so ``/v2/org/app/...?ns=ghcr.io`` is ``ghcr.io/org/app``, the
    same name podman sends in the path). None for routes about no single repository."""
    name = request.match_info.get("name")
    if name is None:
        return None
    ns = request.query.get("ns")
    return f"{ns}/{name}" if ns else name


@web.middleware
async def check_access(request: web.Request, handler: Handler) -> web.StreamResponse:
    action = ACTIONS.get(request.match_info.route.name or "")
    if action is not None:
        authorization = request.headers.get("Authorization")
        name = repository_name(request)
        request[ACTOR] = await request.app[ACCESS].check(action, authorization, request.remote, name)
    return await handler(request)
