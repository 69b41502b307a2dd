"""The access middleware: every registry and admin request is classified (ping, pull, push, delete, admin) by its
route name (``mirror.access.ACTIONS``) and checked against the access policy (``mirror.access``), with the
repository name the client used, before its handler runs. A refused push leaves nothing behind: the check comes
before the handler reads a byte of the body."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.access import ACTIONS
from mirror.api.keys import ACCESS

# The actor (user name) of an authenticated request, or None; the notifications report it.
ACTOR: web.RequestKey[str | None] = web.RequestKey("actor", str)


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
