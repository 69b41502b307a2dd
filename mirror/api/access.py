"""The access middleware: every registry request is classified (ping, pull, push, delete) by its route and
checked against the access policy (``mirror.auth``) before its handler runs. A refused push leaves nothing behind:
the check comes before the handler reads a byte of the body."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.keys import ACCESS
from mirror.auth import Action

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
}


@web.middleware
async def check_access(request: web.Request, handler: Handler) -> web.StreamResponse:
    action = ACTIONS.get(request.match_info.route.name or "")
    if action is not None:
        request[ACTOR] = await request.app[ACCESS].check(action, request.headers.get("Authorization"), request.remote)
    return await handler(request)
