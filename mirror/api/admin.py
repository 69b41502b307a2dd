"""``/readyz`` and the JSON admin API under ``/admin/v1/`` (off unless ``--admin-api``; see ``mirror.admin``).

The admin API can remove content and start upstream fetches. With ``--htpasswd`` every call needs credentials and
the ``admin`` action (``api.access``, ``mirror.permissions``); without it the API is open to whoever reaches it:
expose it only where operators are (bind the mirror to a private interface, or filter ``/admin/`` at the proxy in
front). Bad input gets registry error JSON.

    GET    /admin/v1/stats                      size, limit, entries, hit ratio, top repositories
    GET    /admin/v1/ls                         repositories, tags, platforms, size, last served
    GET    /admin/v1/pins                       pinned images
    PUT    /admin/v1/pins?image=alpine:3.19     pin an image (never evicted)
    DELETE /admin/v1/pins?image=alpine:3.19     unpin it
    GET    /admin/v1/evict                      what the next eviction would remove (dry run)
    POST   /admin/v1/evict                      evict to the low watermark now
    POST   /admin/v1/gc[?dry_run=true]          remove unreferenced content, orphans and old temp files
    POST   /admin/v1/verify                     re-hash everything, quarantine mismatches
    POST   /admin/v1/prefetch                   {"images": ["alpine:3.19", ...], "platforms": ["linux/amd64"]}
    GET    /admin/v1/cluster                    the replicas alive: id, advertise address, last seen, fetches
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mirror.admin import Admin
from mirror.oci.errors import NameInvalid, RegistryError

log = logging.getLogger(__name__)
ADMIN = web.AppKey("admin", Admin)
READY: web.AppKey[Callable[[], Awaitable[str | None]]] = web.AppKey("ready")
# With [cluster]: the replicas alive (``storage.members.Members.list``, as dicts); None for one node.
CLUSTER: web.AppKey[Callable[[], Awaitable[list[dict[str, Any]]]] | None] = web.AppKey("cluster")


async def readyz(request: web.Request) -> web.Response:
    """200 when the data dir is writable, the index answers and housekeeping started; 503 with the reason."""
    problem = await request.app[READY]()
    if problem:
        return web.Response(status=503, text=f"not ready: {problem}\n")
    return web.Response(text="ready\n")


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def _image(request: web.Request) -> str:
    image = request.query.get("image", "")
    if not image:
        raise NameInvalid("the image query parameter is required, e.g. ?image=alpine:3.19")
    return image


async def cluster(request: web.Request) -> web.Response:
    """The members of the cluster (503 UNAVAILABLE while Redis is down); one node answers ``"cluster": false``."""
    members = request.app[CLUSTER]
    if members is None:
        return web.json_response({"cluster": False, "members": []})
    return web.json_response({"cluster": True, "members": await members()})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ADMIN].stats())


async def ls(request: web.Request) -> web.Response:
    return web.json_response({"repositories": await request.app[ADMIN].ls()})


async def pins(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ADMIN].pins())


async def pin(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ADMIN].pin(_image(request)))


async def unpin(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ADMIN].unpin(_image(request)))


async def evict(request: web.Request) -> web.Response:
    dry_run = request.method == "GET" or _flag(request, "dry_run")
    return web.json_response(await request.app[ADMIN].evict(dry_run=dry_run))


async def collect(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ADMIN].gc(dry_run=_flag(request, "dry_run")))


async def verify(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ADMIN].verify())


async def prefetch(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise RegistryError("the body must be JSON", status=400) from None
    images = body.get("images") if isinstance(body, dict) else None
    platforms = body.get("platforms", []) if isinstance(body, dict) else []
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise RegistryError('the body must be {"images": ["alpine:3.19", ...]}', status=400)
    if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
        raise RegistryError("platforms must be a list of strings such as linux/amd64", status=400)
    return web.json_response({"images": await request.app[ADMIN].prefetch(images, platforms)})
