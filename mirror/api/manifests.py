"""``/v2/<name>/manifests/<reference>``: GET/HEAD answer the manifest's exact bytes and its own media type; PUT and
DELETE push and delete manifests of local repositories (OCI distribution spec, "Pushing manifests", "Deleting
manifests")::

    PUT    /v2/<name>/manifests/<tag|digest>   validate, check references, store: 201 + Location, Docker-Content-Digest
                                               (+ OCI-Subject when the manifest has a subject)
    DELETE /v2/<name>/manifests/<digest>       the manifest and its tags: 202
    DELETE /v2/<name>/manifests/<tag>          that tag only: 202

Every push and delete of a manifest is published to the webhook notifier (after the answer is decided, never
waiting for delivery).
"""

from __future__ import annotations

import uuid

from aiohttp import web

from mirror.api.access import ACTOR
from mirror.api.content import content_for
from mirror.api.keys import LOCAL, METRICS, NOTIFY, RESOLVE
from mirror.notify import Event, RequestInfo
from mirror.oci import errors
from mirror.oci.manifest import MAX_MANIFEST_BYTES
from mirror.oci.mediatypes import parse_accept
from mirror.oci.reference import Digest, Repo, lookup_reference, parse_reference

STALE_HEADERS = {"Warning": '110 mirror "Response is Stale"', "X-Mirror-Stale": "true"}


def manifest_headers(digest: Digest, media_type: str, stale: bool) -> dict[str, str]:
    headers = {
        "Content-Type": media_type,
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
    }
    if stale:
        headers.update(STALE_HEADERS)
    return headers


async def get_manifest(request: web.Request) -> web.StreamResponse:
    repo = request.app[RESOLVE](request.match_info["name"], request.query.get("ns"))
    ref = lookup_reference(request.match_info["reference"])
    accepted = parse_accept(request.headers.getall("Accept", []))
    pull = content_for(request.app, repo)
    if request.method == "HEAD":
        head, stale = await pull.manifest_head(repo, ref, accepted)
        resp = web.StreamResponse(headers=manifest_headers(head.digest, head.media_type, stale))
        resp.content_length = head.size
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    answer = await pull.manifest(repo, ref, accepted)
    headers = manifest_headers(answer.digest, answer.media_type, answer.stale)
    if request.headers.get("If-None-Match", "").strip() in (f'"{answer.digest}"', str(answer.digest)):
        return web.Response(status=304, headers=headers)
    return web.Response(body=answer.data, headers=headers)


# --- PUT and DELETE: local repositories only ----------------------------------------------------------------
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
