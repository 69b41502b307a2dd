"""The ``/v2/`` route table.

Repository names contain slashes, so every route captures ``{name:.+}`` and the handler turns it, with the
``?ns=`` parameter, into a ``Repo`` through ``RESOLVE`` (routing rules: ``oci.reference.route``). Route names are
the ``route`` label of the request metrics: a small, fixed set.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirror.api.blobs import get_blob
from mirror.api.keys import METRICS
from mirror.api.listing import list_tags
from mirror.api.manifests import get_manifest
from mirror.api.push_routes import add_push_routes
from mirror.api.uploads import head_blob

NAME = "{name:[^?#]+?}"


async def base(request: web.Request) -> web.Response:
    """``GET /v2/``: 200 means "a registry, no auth needed" (clients call it before every pull)."""
    return web.json_response({})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v2/", base, name="base")
    router.add_get("/v2", base, name="base_noslash")
    router.add_route("GET", f"/v2/{NAME}/manifests/{{reference}}", get_manifest, name="manifest")
    router.add_route("HEAD", f"/v2/{NAME}/manifests/{{reference}}", get_manifest, name="manifest_head")
    router.add_route("GET", f"/v2/{NAME}/blobs/{{digest}}", get_blob, name="blob")
    router.add_route("HEAD", f"/v2/{NAME}/blobs/{{digest}}", head_blob, name="blob_head")
    router.add_get(f"/v2/{NAME}/tags/list", list_tags, name="tags", allow_head=False)
    add_push_routes(router)
    router.add_get("/healthz", healthz, name="healthz")
    router.add_get("/metrics", metrics, name="metrics")
