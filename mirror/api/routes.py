"""The route table: every path the mirror answers, in one place.

Repository names contain slashes, so every route captures ``NAME`` (any run of characters up to the next fixed
segment; the name grammar itself is checked once, by ``oci.reference``) and the handler turns it, with the
``?ns=`` parameter, into a ``Repo`` through ``RESOLVE`` (pulled through) or ``LOCAL`` (pushed). Route names are
the ``route`` label of the request metrics and the key of the access policy (``access.ACTIONS``): a small, fixed set,
and methods of one path share one name where the policy treats them alike.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirror.api import admin, peer, ui
from mirror.api.blobs import delete_blob, get_blob, head_blob
from mirror.api.forward import UPLOADS_PATH
from mirror.api.keys import METRICS
from mirror.api.listing import catalog, list_tags
from mirror.api.manifests import delete_manifest, get_manifest, put_manifest
from mirror.api.referrers import get_referrers
from mirror.api.ui import actions, overview, repositories, upstreams
from mirror.api.uploads import (
    FOR_PEER,
    cancel_upload,
    patch_upload,
    put_upload,
    start_upload,
    upload_for_peer,
    upload_status,
)

NAME = "{name:[^?#]+?}"


async def base(request: web.Request) -> web.Response:
    """``GET /v2/``: 200 means "a registry, no auth needed" (clients call it before every pull)."""
    return web.json_response({})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    """``/metrics``: this process's metrics, or with several processes on the host (``PROMETHEUS_MULTIPROC_DIR``)
    every process's, read from their files in a thread."""
    metrics = request.app[METRICS]
    registry = metrics.host()  # on the loop: copies what lives in this process's memory
    if metrics.shared_dir is None:
        body = generate_latest(registry)
    else:
        body = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(
    router: web.UrlDispatcher, admin_api: bool = False, web_page: bool = False, cluster: bool = False
) -> None:
    """The whole table; the admin API (``/admin/v1/``) only with ``--admin-api``, the web page (``/ui/``)
    unless ``--ui off``, the replicas' internal endpoint (``api.peer``) only in a cluster."""
    add_registry_routes(router)
    add_push_routes(router)
    router.add_get("/healthz", healthz, name="healthz")
    router.add_get("/metrics", metrics, name="metrics")
    router.add_get("/readyz", admin.readyz, name="readyz")
    if cluster:  # the registry name is one path segment: upstream names are hosts, and quoted by the client
        router.add_get("/_mirror/v1/fetches/{registry}/{digest}", peer.fetch_for_peer, name="peer_fetch")
        for method in FOR_PEER:  # sessions held here, requests forwarded by the replica a client reached
            router.add_route(method, f"{UPLOADS_PATH}/{{uuid}}/{NAME}", upload_for_peer, name="peer_upload")
    if admin_api:
        add_admin_routes(router)
    if web_page:
        add_ui_routes(router, actions=admin_api)


def add_registry_routes(router: web.UrlDispatcher) -> None:
    """Reads (OCI distribution spec, "Pull"): pulled through, or answered from a local repository."""
    router.add_get("/v2/", base, name="base")
    router.add_get("/v2", base, name="base_noslash")
    router.add_route("GET", f"/v2/{NAME}/manifests/{{reference}}", get_manifest, name="manifest")
    router.add_route("HEAD", f"/v2/{NAME}/manifests/{{reference}}", get_manifest, name="manifest_head")
    router.add_route("GET", f"/v2/{NAME}/blobs/{{digest}}", get_blob, name="blob")
    router.add_route("HEAD", f"/v2/{NAME}/blobs/{{digest}}", head_blob, name="blob_head")
    router.add_get(f"/v2/{NAME}/tags/list", list_tags, name="tags", allow_head=False)
    router.add_get(f"/v2/{NAME}/referrers/{{digest}}", get_referrers, name="referrers", allow_head=False)
    router.add_get("/v2/_catalog", catalog, name="catalog", allow_head=False)


def add_push_routes(router: web.UrlDispatcher) -> None:
    """Writes to local repositories (OCI distribution spec, "Push", "Content Management")."""
    router.add_post(f"/v2/{NAME}/blobs/uploads/", start_upload, name="upload_start")
    router.add_route("PATCH", f"/v2/{NAME}/blobs/uploads/{{uuid}}", patch_upload, name="upload")
    router.add_route("PUT", f"/v2/{NAME}/blobs/uploads/{{uuid}}", put_upload, name="upload")
    router.add_route("GET", f"/v2/{NAME}/blobs/uploads/{{uuid}}", upload_status, name="upload")
    router.add_route("DELETE", f"/v2/{NAME}/blobs/uploads/{{uuid}}", cancel_upload, name="upload")
    router.add_route("DELETE", f"/v2/{NAME}/blobs/{{digest}}", delete_blob, name="blob_delete")
    router.add_route("PUT", f"/v2/{NAME}/manifests/{{reference}}", put_manifest, name="manifest_put")
    router.add_route("DELETE", f"/v2/{NAME}/manifests/{{reference}}", delete_manifest, name="manifest_delete")


def add_admin_routes(router: web.UrlDispatcher) -> None:
    """The JSON admin API (``api.admin``; the ``admin`` action of the access policy)."""
    router.add_get("/admin/v1/stats", admin.stats, name="admin_stats")
    router.add_get("/admin/v1/ls", admin.ls, name="admin_ls")
    router.add_get("/admin/v1/pins", admin.pins, name="admin_pins")
    router.add_put("/admin/v1/pins", admin.pin, name="admin_pin")
    router.add_delete("/admin/v1/pins", admin.unpin, name="admin_unpin")
    router.add_get("/admin/v1/evict", admin.evict, name="admin_evict_plan", allow_head=False)
    router.add_post("/admin/v1/evict", admin.evict, name="admin_evict")
    router.add_post("/admin/v1/gc", admin.collect, name="admin_gc")
    router.add_post("/admin/v1/verify", admin.verify, name="admin_verify")
    router.add_post("/admin/v1/prefetch", admin.prefetch, name="admin_prefetch")
    router.add_get("/admin/v1/cluster", admin.cluster, name="admin_cluster")


def add_ui_routes(router: web.UrlDispatcher, actions: bool = False) -> None:
    """The web page (``api.ui``), its actions with the admin API; any other path under ``/ui/`` is its HTML 404
    page."""
    router.add_get("/", ui.root, name="ui_root", allow_head=False)
    router.add_get("/ui/", overview.overview, name="ui_overview")
    router.add_get("/ui", ui.root, name="ui_noslash", allow_head=False)
    router.add_get("/ui/inflight.json", overview.inflight_json, name="ui_inflight")
    router.add_get("/ui/live.js", ui.script, name="ui_script")
    router.add_get("/ui/static/{file}", ui.script, name="ui_static")
    router.add_get("/ui/repositories", repositories.repositories, name="ui_repositories")
    router.add_get(f"/ui/repositories/{NAME}", repositories.repository, name="ui_repository")
    router.add_get(f"/ui/images/{NAME}", repositories.image, name="ui_image")
    router.add_get("/ui/upstreams", upstreams.upstreams, name="ui_upstreams")
    router.add_get("/ui/login", ui.login, name="ui_login", allow_head=False)
    if actions:
        add_ui_action_routes(router)
    router.add_route("*", "/ui/{tail:.*}", ui.missing, name="ui_missing")


def add_ui_action_routes(router: web.UrlDispatcher) -> None:
    """Pin, unpin, evict, gc dry run, prefetch from the page (``api.ui.actions``; with --admin-api only)."""
    router.add_get("/ui/actions/", actions.actions, name="ui_actions")
    router.add_get("/ui/actions/{action}", actions.confirm, name="ui_confirm")
    router.add_post("/ui/actions/{action}", actions.act, name="ui_act")
    router.add_get("/ui/jobs/{id}.json", actions.job_json, name="ui_job_json")
    router.add_get("/ui/jobs/{id}", actions.job, name="ui_job")
