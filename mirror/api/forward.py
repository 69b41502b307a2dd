"""Upload sessions across replicas (``[cluster]``): a session's bytes live on the replica that opened it, and a
request for it that reaches another replica (a load balancer spreads a chunked push) is forwarded there.

The replica that opens a session records itself as its holder in Redis (``storage.uploadowners``; renewed at
every chunk). A replica that gets a PATCH, PUT, GET or DELETE of a session it does not hold looks the holder up
and sends the request to the holder's internal endpoint ``<advertise>/_mirror/v1/uploads/<uuid>/<name>`` with the
cluster secret (the body streamed, never held; the client was already authorized here), then answers the
client with the holder's status, headers and body. A session nobody holds is BLOB_UPLOAD_UNKNOWN, as on one
node; one whose holder cannot be reached too (its bytes are there, out of reach: the client starts the upload
again). A forwarded request is never forwarded again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from aiohttp import web

from mirror.api.keys import LOCAL
from mirror.oci import errors
from mirror.upstream.peers import PeerClient, PeerGone

UPLOADS_PATH = "/_mirror/v1/uploads"
SENT = ("Content-Range", "Content-Type", "Content-Length")  # what the holder needs of the client's request
ANSWERED = ("Location", "Range", "Docker-Upload-UUID", "Docker-Content-Digest", "Content-Type")
FROM_PEER = web.RequestKey("forwarded_from_peer", bool)


class Holders(Protocol):
    advertise: str

    async def claim(self, uuid: str) -> None: ...
    async def holder(self, uuid: str) -> str | None: ...
    async def release(self, uuid: str) -> None: ...


@dataclass(frozen=True, slots=True)
class UploadForwarding:
    holders: Holders
    client: PeerClient


FORWARDING = web.AppKey("upload_forwarding", UploadForwarding)


async def forwarded(request: web.Request, uuid: str) -> web.Response | None:
    """The holder's answer when another replica holds the session ``uuid``; None when this one answers."""
    forwarding = request.app.get(FORWARDING)
    if forwarding is None or request.get(FROM_PEER) or await request.app[LOCAL].uploads.holds(uuid):
        return None
    holder = await forwarding.holders.holder(uuid)
    if holder is None or holder == forwarding.holders.advertise:
        return None  # nobody holds it: answered here (BLOB_UPLOAD_UNKNOWN)
    name = request.match_info["name"]
    path = f"{UPLOADS_PATH}/{uuid}/{quote(name)}" + (f"?{request.query_string}" if request.query_string else "")
    headers = {h: request.headers[h] for h in SENT if h in request.headers}
    body = request.content.iter_any() if request.can_read_body else None
    try:
        answer = await forwarding.client.forward(holder, request.method, path, headers, body)
    except PeerGone as exc:
        raise errors.BlobUploadUnknown(
            "the replica holding this upload session cannot be reached; start the upload again",
            detail={"uuid": uuid[:64]},
        ) from exc
    kept = {h: answer.headers[h] for h in ANSWERED if h in answer.headers}
    return web.Response(status=answer.status, body=answer.body, headers=kept)


async def claimed(request: web.Request, uuid: str) -> None:
    """This replica holds ``uuid`` (opened, or a chunk acknowledged): recorded for the others."""
    forwarding = request.app.get(FORWARDING)
    if forwarding is not None:
        await forwarding.holders.claim(uuid)


async def released(request: web.Request, uuid: str) -> None:
    """The session ``uuid`` ended here (completed or cancelled)."""
    forwarding = request.app.get(FORWARDING)
    if forwarding is not None:
        await forwarding.holders.release(uuid)
