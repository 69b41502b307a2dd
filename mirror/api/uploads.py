"""Blob uploads, ``/v2/<name>/blobs/uploads/`` only (OCI distribution spec, "Pushing blobs"):

POST   /v2/<name>/blobs/uploads/                 202 + session (Location, Range, Docker-Upload-UUID)
POST   /v2/<name>/blobs/uploads/?digest=<d>       monolithic upload: 201
POST   /v2/<name>/blobs/uploads/?mount=<d>&from=  cross-repository mount: 201, or 202 + a session
PATCH  /v2/<name>/blobs/uploads/<uuid>            a chunk (Content-Range) or a stream: 202; out of order 416
PUT    /v2/<name>/blobs/uploads/<uuid>?digest=<d> last chunk (optional), verify, publish: 201
GET    /v2/<name>/blobs/uploads/<uuid>            status: 204 + Range
DELETE /v2/<name>/blobs/uploads/<uuid>            cancel: 204

In a cluster a session lives on the replica that opened it, and the others forward its requests there
(``api.forward``; the holder answers them at ``/_mirror/v1/uploads/<uuid>/<name>``, ``upload_for_peer``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable

from aiohttp import web

from mirror.api.access import ACTOR
from mirror.api.forward import FROM_PEER, claimed, forwarded, released
from mirror.api.keys import ACCESS, LOCAL
from mirror.api.peer import PEERING, authorized
from mirror.oci import errors
from mirror.oci.reference import LOCAL as LOCAL_REGISTRY
from mirror.oci.reference import Digest, Repo, validate_name
from mirror.permissions import Action
from mirror.push.uploads import upload_headers

# The spec's form is "<start>-<end>"; some clients write "bytes <start>-<end>/<total>" as in RFC 9110.
_CONTENT_RANGE_RE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


def parse_content_range(header: str | None) -> tuple[int, int] | None:
    if header is None:
        return None
    match = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if match is None:
        raise errors.BlobUploadInvalid(f"malformed Content-Range {header[:100]!r}: expected <start>-<end>")
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise errors.BlobUploadInvalid(f"Content-Range {header[:100]!r} ends before it starts")
    return start, end


def body(request: web.Request) -> AsyncIterable[bytes]:
    return request.content.iter_any()


def upload_target(request: web.Request) -> tuple[Repo, str]:
    """The local repository and session an upload URL names. Sessions belong to one repository."""
    name = request.match_info["name"]
    uuid = request.match_info["uuid"]
    if request.query.get("ns") is not None:
        raise errors.BlobUploadUnknown("upload sessions belong to local repositories, named without ?ns=")
    return Repo(LOCAL_REGISTRY, validate_name(name)), uuid


def blob_created(repo: Repo, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={"Location": f"/v2/{repo.path}/blobs/{digest}", "Docker-Content-Digest": str(digest)},
    )


async def start_upload(request: web.Request) -> web.Response:
    local = request.app[LOCAL]
    repo = await local.target(request.match_info["name"], request.query.get("ns"))
    mount = request.query.get("mount")
    if mount is not None:
        digest = Digest.parse(mount)
        access, actor = request.app[ACCESS], request.get(ACTOR)
        if await local.mount(
            repo, digest, request.query.get("from"), lambda name: access.may(actor, Action.PULL, name)
        ):
            return blob_created(repo, digest)
    elif "digest" in request.query:
        digest = Digest.parse(request.query["digest"])
        await local.uploads.monolithic(repo, digest, body(request), request.content_length)
        return blob_created(repo, digest)
    session = await local.uploads.start(repo, request.remote or "")
    await claimed(request, session.uuid)
    return web.Response(status=202, headers=upload_headers(repo, session))


async def patch_upload(request: web.Request) -> web.Response:
    repo, uuid = upload_target(request)
    if (answer := await forwarded(request, uuid)) is not None:
        return answer
    content_range = parse_content_range(request.headers.get("Content-Range"))
    session = await request.app[LOCAL].uploads.append(repo, uuid, body(request), content_range, request.content_length)
    await claimed(request, uuid)  # renewed: held for another idle age
    return web.Response(status=202, headers=upload_headers(repo, session))


async def put_upload(request: web.Request) -> web.Response:
    repo, uuid = upload_target(request)
    if (answer := await forwarded(request, uuid)) is not None:
        return answer
    raw = request.query.get("digest")
    if raw is None:
        raise errors.DigestInvalid("the digest parameter is missing: PUT ...?digest=<digest> completes an upload")
    digest = Digest.parse(raw)
    content_range = parse_content_range(request.headers.get("Content-Range"))
    await request.app[LOCAL].uploads.finish(repo, uuid, digest, body(request), content_range, request.content_length)
    await released(request, uuid)
    return blob_created(repo, digest)


async def upload_status(request: web.Request) -> web.Response:
    repo, uuid = upload_target(request)
    if (answer := await forwarded(request, uuid)) is not None:
        return answer
    session = await request.app[LOCAL].uploads.status(repo, uuid)
    return web.Response(status=204, headers=upload_headers(repo, session))


async def cancel_upload(request: web.Request) -> web.Response:
    repo, uuid = upload_target(request)
    if (answer := await forwarded(request, uuid)) is not None:
        return answer
    await request.app[LOCAL].uploads.cancel(repo, uuid)
    await released(request, uuid)
    return web.Response(status=204)


FOR_PEER = {"PATCH": patch_upload, "PUT": put_upload, "GET": upload_status, "DELETE": cancel_upload}


async def upload_for_peer(request: web.Request) -> web.Response:
    """A request on a session this replica holds, forwarded by the replica the client reached (which authorized
    the client); only with the cluster secret (401 otherwise, as ``api.peer``)."""
    if not authorized(request, request.app[PEERING].secret):
        raise errors.Unauthorized()
    request[FROM_PEER] = True
    return await FOR_PEER[request.method](request)
