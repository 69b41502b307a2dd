"""The routes of the push side (local repositories), appended to the ``/v2/`` route table by ``routes.add_routes``.

Route names are the ``route`` label of the request metrics and the key of the access policy (``api.access``):
methods of one path share one name.
"""

from __future__ import annotations

from aiohttp import web

from mirror.api.catalog import catalog
from mirror.api.push_manifests import delete_manifest, get_referrers, put_manifest
from mirror.api.uploads import (
    cancel_upload,
    delete_blob,
    patch_upload,
    put_upload,
    start_upload,
    upload_status,
)

NAME = "{name:[^?#]+?}"


def add_push_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v2/_catalog", catalog, name="catalog", allow_head=False)
    router.add_post(f"/v2/{NAME}/blobs/uploads/", start_upload, name="upload_start")
    router.add_route("PATCH", f"/v2/{NAME}/blobs/uploads/{{uuid}}", patch_upload, name="upload")
    router.add_route("PUT", f"/v2/{NAME}/blobs/uploads/{{uuid}}", put_upload, name="upload")
    router.add_route("GET", f"/v2/{NAME}/blobs/uploads/{{uuid}}", upload_status, name="upload")
    router.add_route("DELETE", f"/v2/{NAME}/blobs/uploads/{{uuid}}", cancel_upload, name="upload")
    router.add_route("DELETE", f"/v2/{NAME}/blobs/{{digest}}", delete_blob, name="blob_delete")
    router.add_route("PUT", f"/v2/{NAME}/manifests/{{reference}}", put_manifest, name="manifest_put")
    router.add_route("DELETE", f"/v2/{NAME}/manifests/{{reference}}", delete_manifest, name="manifest_delete")
    router.add_get(f"/v2/{NAME}/referrers/{{digest}}", get_referrers, name="referrers", allow_head=False)
