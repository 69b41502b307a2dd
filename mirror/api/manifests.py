"""``GET``/``HEAD /v2/<name>/manifests/<reference>``: the manifest's exact bytes and its own media type."""

from __future__ import annotations

from aiohttp import web

from mirror.api.content import content_for
from mirror.api.keys import RESOLVE
from mirror.oci.mediatypes import parse_accept
from mirror.oci.reference import Digest, lookup_reference

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
