"""Manifests pushed and deleted, and the referrers API (OCI distribution spec 1.1):

    PUT    /v2/<name>/manifests/<tag|digest>   validate, check references, store: 201 + Location, Docker-Content-Digest
                                               (+ OCI-Subject when the manifest has a subject)
    DELETE /v2/<name>/manifests/<digest>       the manifest and its tags: 202
    DELETE /v2/<name>/manifests/<tag>          that tag only: 202
    GET    /v2/<name>/referrers/<digest>       an image index of the manifests whose subject is <digest>,
                                               ``?artifactType=`` filters (OCI-Filters-Applied: artifactType)

Every push and delete of a manifest is published to the webhook notifier (after the answer is decided, never
waiting for delivery).
"""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from mirror.api.access import ACTOR
from mirror.api.keys import LOCAL, METRICS, NOTIFY, PULL, RESOLVE
from mirror.notify import Event, RequestInfo
from mirror.oci import errors
from mirror.oci.manifest import MAX_MANIFEST_BYTES
from mirror.oci.mediatypes import OCI_INDEX
from mirror.oci.reference import LOCAL as LOCAL_REGISTRY
from mirror.oci.reference import Digest, Repo, lookup_reference, parse_reference


async def read_manifest_body(request: web.Request) -> bytes:
    """The whole body, refusing more than MAX_MANIFEST_BYTES without reading past the limit."""
    too_big = errors.ManifestInvalid(
        f"manifest is larger than the {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB limit", status=413
    )
    if request.content_length is not None and request.content_length > MAX_MANIFEST_BYTES:
        raise too_big
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_MANIFEST_BYTES:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


def publish(
    request: web.Request, action: str, repo: Repo, digest: Digest, media_type: str, size: int, tag: str | None
) -> None:
    request.app[METRICS].manifest_changes.labels(action).inc()
    notifier = request.app[NOTIFY]
    if not notifier.enabled:
        return
    info = RequestInfo(
        id=request.headers.get("X-Request-Id") or str(uuid.uuid4()),
        addr=request.remote or "",
        host=request.host,
        method=request.method,
        useragent=request.headers.get("User-Agent", ""),
    )
    url = f"{request.scheme}://{request.host}/v2/{repo.path}/manifests/{digest}"
    notifier.publish(Event(action, repo.path, str(digest), media_type, size, tag, request.get(ACTOR), url, info))


async def put_manifest(request: web.Request) -> web.Response:
    local = request.app[LOCAL]
    repo = await local.target(request.match_info["name"], request.query.get("ns"))
    ref = parse_reference(request.match_info["reference"])
    data = await read_manifest_body(request)
    pushed = await local.put_manifest(repo, ref, request.headers.get("Content-Type", ""), data)
    headers = {"Location": f"/v2/{repo.path}/manifests/{pushed.digest}", "Docker-Content-Digest": str(pushed.digest)}
    if pushed.subject is not None:
        headers["OCI-Subject"] = str(pushed.subject)
    publish(request, "push", repo, pushed.digest, pushed.media_type, pushed.size, pushed.tag)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    local = request.app[LOCAL]
    repo = local.existing(request.match_info["name"], request.query.get("ns"))
    ref = lookup_reference(request.match_info["reference"])
    for deleted in await local.delete_manifest(repo, ref):
        publish(request, "delete", repo, deleted.digest, deleted.media_type, deleted.size, deleted.tag)
    return web.Response(status=202)


async def get_referrers(request: web.Request) -> web.Response:
    repo = request.app[RESOLVE](request.match_info["name"], request.query.get("ns"))
    subject = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType") or None
    if repo.registry == LOCAL_REGISTRY:
        index = await request.app[LOCAL].referrers(repo, subject, artifact_type)
        filtered = artifact_type is not None
    else:
        index, filtered = await request.app[PULL].referrers(repo, subject, artifact_type)
        if artifact_type is not None and not filtered:  # the upstream ignored the filter: apply it here
            index["manifests"] = [m for m in index["manifests"] if m.get("artifactType") == artifact_type]
            filtered = True
    headers = {"Content-Type": OCI_INDEX}
    if filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=json.dumps(index).encode(), headers=headers)
