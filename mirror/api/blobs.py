"""``GET``/``HEAD /v2/<name>/blobs/<digest>``: hits by sendfile (or from memory), misses streamed while they
arrive (``api.streaming``)."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Awaitable, Callable
from typing import IO, Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETag

from mirror.api.conditional import blob_range, for_file
from mirror.api.content import content_for
from mirror.api.keys import BUCKET, LOCAL, METRICS, REDIRECT, RESOLVE, USAGE
from mirror.api.streaming import SENDER, Sender, blob_headers, stream_fetch, usable
from mirror.content import MemoryBlob, StoredBlob
from mirror.oci import errors
from mirror.oci.reference import Digest, Repo, validate_name
from mirror.pull.failures import failure
from mirror.pull.inflight import FetchState
from mirror.storage.base import RemoteBlobs


class BlobVanished(Exception):
    """The stored file was gone when aiohttp came to open it (not an OSError: aiohttp would answer 404 itself)."""


Fallback = Callable[[], Awaitable[web.StreamResponse]]


class BlobFileResponse(web.FileResponse):
    """aiohttp's FileResponse (stat/open in a thread, sendfile, Range) with the digest as ETag, as registries
    send it, instead of aiohttp's mtime-based one.

    A file removed between the lookup and aiohttp's open (evicted by another process sharing the data dir, whose
    eviction cannot see this process's leases) is a miss: ``vanished`` answers the request instead (the lookup
    again, which now fetches the blob), never a 404. Once open, the file stays readable whoever unlinks it."""

    def __init__(self, path: Any, digest: Digest, sender: Sender, vanished: Fallback | None = None, **kwargs: Any):
        super().__init__(path, **kwargs)
        self._digest_etag = str(digest)
        self._sender = sender
        self._release: Callable[[], None] | None = None
        self._vanished = vanished
        self._instead: web.StreamResponse | None = None  # the answer sent in place of this one

    def release_after_send(self, release: Callable[[], None]) -> None:
        """Call ``release`` once the file is sent (or the response is dropped unsent)."""
        self._release = release
        weakref.finalize(self, release)

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int) -> AbstractStreamWriter:
        """aiohttp's own, but with the copying done by the app's worker threads (``api.streaming.Sender``) on
        plain connections."""
        transport = request.transport
        if transport is None or not usable(transport):
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        await self._sender.send_file(transport, fobj, offset, count)
        await web.StreamResponse.write_eof(self)
        return writer

    def _make_response(self, request: web.BaseRequest, accept_encoding: str) -> Any:
        try:
            return super()._make_response(request, accept_encoding)  # aiohttp's own (private): stat, open
        except FileNotFoundError:
            raise BlobVanished from None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(for_file(request, self._digest_etag))  # opens the file, sendfile
        except BlobVanished:
            if self._vanished is None:
                raise web.HTTPNotFound() from None  # vanished twice in a row: as aiohttp would answer
            self._instead = instead = await self._vanished()
            if not instead.prepared:
                await instead.prepare(request)
            self.set_status(instead.status)  # for the access log
            return None
        finally:
            if self._release is not None:
                self._release()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._instead is not None:
            await self._instead.write_eof(data)
        else:
            await super().write_eof(data)

    @property
    def etag(self) -> ETag | None:
        return super().etag

    @etag.setter
    def etag(self, value: ETag | str | None) -> None:
        # The parent's setter, called on the property object: mypy types a property read on the class as its
        # getter's value, so it does not see ``fset``.
        web.FileResponse.etag.fset(self, self._digest_etag)  # type: ignore[attr-defined]


def parse_target(request: web.Request) -> tuple[Repo, Digest]:
    repo = request.app[RESOLVE](request.match_info["name"], request.query.get("ns"))
    return repo, Digest.parse(request.match_info["digest"])


async def get_blob(request: web.Request) -> web.StreamResponse:
    """The blob is leased while it is sent: eviction never removes a file a client is about to open or reading."""
    repo, digest = parse_target(request)
    release = request.app[USAGE].hold(digest)
    try:
        resp = await _get_blob(request, repo, digest)
    except BaseException:
        release()
        raise
    if isinstance(resp, BlobFileResponse) and not resp.prepared:
        resp.release_after_send(release)  # aiohttp sends a FileResponse after the handler returns
    else:
        release()
    return resp


async def _get_blob(request: web.Request, repo: Repo, digest: Digest) -> web.StreamResponse:
    content = content_for(request.app, repo)
    if request.method == "HEAD":
        source = await content.blob_head(repo, digest)
    else:
        source = await content.blob(repo, digest)
    if isinstance(source, int):  # HEAD of a blob we do not hold: the size the upstream announced
        return await _announced(request, digest, source)
    if isinstance(source, MemoryBlob):
        return memory_response(request, repo, digest, source.data)
    if isinstance(source, StoredBlob):
        return await stored_response(request, repo, digest, source)
    if source.size is not None:  # a fetch under way
        return await stream_fetch(request, repo, digest, source)
    # No Content-Length from the upstream: wait for the end and serve the file (rare; registries send it).
    return await stored_response(request, repo, digest, await _stored_when_done(source))


async def stored_response(request: web.Request, repo: Repo, digest: Digest, blob: StoredBlob) -> web.StreamResponse:
    """A stored blob: by sendfile from its file, or from an object store: its local tier's copy by sendfile (the
    bucket if the copy went meanwhile), else the bucket."""
    bucket = request.app.get(BUCKET)
    if bucket is None:
        return file_response(request, repo, digest, blob, vanished=lambda: _get_blob(request, repo, digest))
    copy = bucket.local_copy(digest)
    if copy is not None:
        remote = bucket

        async def from_bucket() -> web.StreamResponse:
            return await bucket_response(request, repo, digest, blob.size, remote)

        return file_response(request, repo, digest, StoredBlob(copy, blob.size), vanished=from_bucket)
    return await bucket_response(request, repo, digest, blob.size, bucket)


async def _announced(request: web.Request, digest: Digest, size: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers=blob_headers(digest))
    resp.content_length = size
    resp.etag = str(digest)
    await resp.prepare(request)
    await resp.write_eof()
    return resp


async def _stored_when_done(fetch: FetchState) -> StoredBlob:
    await fetch.wait_done()
    if fetch.final_path is None:  # nothing was sent yet: a registry error (507 for a full disk), not a cut
        raise failure(fetch.error or RuntimeError("the fetch ended without a result"))
    return StoredBlob(fetch.final_path, fetch.written)


def file_response(
    request: web.Request, repo: Repo, digest: Digest, blob: StoredBlob, vanished: Fallback | None = None
) -> web.StreamResponse:
    """A stored blob by sendfile, with Range and conditional GET; ``vanished`` answers if the file is gone."""
    if _etag_matches(request.headers.get(hdrs.IF_NONE_MATCH), digest):
        return web.Response(status=304, headers={**blob_headers(digest), "ETag": f'"{digest}"'})
    rng = blob_range(request, digest, blob.size)
    count = blob.size if rng is None else rng[1] - rng[0]
    if request.method == "GET":
        request.app[METRICS].blob_bytes_served.labels(repo.registry, "cache").inc(count)
        request.app[METRICS].repos.served(str(repo), "cache", count)
    sender = request.app[SENDER]
    return BlobFileResponse(blob.path, digest, sender, vanished, headers=blob_headers(digest), chunk_size=1 << 20)


async def bucket_response(
    request: web.Request, repo: Repo, digest: Digest, size: int, bucket: RemoteBlobs
) -> web.StreamResponse:
    """A blob in object storage: with ``redirect``, a 307 to a presigned URL of the object (the bytes bypass the
    mirror, as Distribution's redirect does); else streamed from one GET of the client's range, passed through."""
    headers = {**blob_headers(digest), "ETag": f'"{digest}"'}
    if _etag_matches(request.headers.get(hdrs.IF_NONE_MATCH), digest):
        return web.Response(status=304, headers=headers)
    if request.method == "GET" and request.app[REDIRECT]:
        return web.Response(status=307, headers={**headers, "Location": await bucket.presigned_url(digest)})
    rng = blob_range(request, digest, size)
    start, end = rng if rng is not None else (0, size)
    resp = web.StreamResponse(status=200 if rng is None else 206, headers=headers)
    resp.content_length = end - start
    if rng is not None:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD" or end == start:
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    bucket.warm(digest, size)  # the next hits from the local tier, if there is one
    async with contextlib.aclosing(bucket.stream(digest, start, end)) as chunks:  # closed if the client goes
        try:
            first = await anext(chunks)  # before the status is sent: an object gone meanwhile is a 404, not a cut
        except (FileNotFoundError, StopAsyncIteration):
            raise errors.BlobUnknown(detail={"digest": str(digest)}) from None
        await resp.prepare(request)
        sent = len(first)
        await resp.write(first)
        async for chunk in chunks:
            await resp.write(chunk)
            sent += len(chunk)
    request.app[METRICS].blob_bytes_served.labels(repo.registry, "cache").inc(sent)
    request.app[METRICS].repos.served(str(repo), "cache", sent)
    await resp.write_eof()
    return resp


def memory_response(request: web.Request, repo: Repo, digest: Digest, data: bytes) -> web.Response:
    """A small blob from memory, with the same headers, Range and conditional GET as a file answer."""
    headers = blob_headers(digest)
    headers["ETag"] = f'"{digest}"'
    if _etag_matches(request.headers.get(hdrs.IF_NONE_MATCH), digest):
        return web.Response(status=304, headers=headers)
    rng = blob_range(request, digest, len(data))
    status, body = 200, data
    if rng is not None:
        status, body = 206, data[rng[0] : rng[1]]
        headers["Content-Range"] = f"bytes {rng[0]}-{rng[1] - 1}/{len(data)}"
    if request.method == "GET":
        request.app[METRICS].blob_bytes_served.labels(repo.registry, "cache").inc(len(body))
        request.app[METRICS].repos.served(str(repo), "cache", len(body))
    return web.Response(status=status, body=body, headers=headers)


def _etag_matches(header: str | None, digest: Digest) -> bool:
    if not header:
        return False
    wanted = str(digest)
    return any(tag.strip().removeprefix("W/").strip('"') in (wanted, "*") for tag in header.split(","))


# --- HEAD and DELETE of /blobs/<digest>: the local registry first, then the pull-through ----------------------
# HEAD /v2/<name>/blobs/<digest>    existence ("Layer already exists" before a push)
# DELETE /v2/<name>/blobs/<digest>  unlink from a local repository: 202
async def head_blob(request: web.Request) -> web.StreamResponse:
    """Existence of a blob. For a local repository: linked into it. For a name that may be pushed to but has not
    been yet: held by the store (a client about to push asks this; the upstream is not asked, as Docker Hub
    answers 401 for repositories that do not exist there). Otherwise: the pull-through HEAD."""
    local = request.app[LOCAL]
    name, ns = request.match_info["name"], request.query.get("ns")
    repo = local.local(name, ns)
    if repo is None and not local.pushable(name, ns):
        return await get_blob(request)
    digest = Digest.parse(request.match_info["digest"])
    if repo is not None:
        stored = await local.blob_head(repo, digest)
    else:
        validate_name(name)
        stored = await local.stored_blob(digest)
    resp = web.StreamResponse(headers=blob_headers(digest))
    resp.content_length = stored.size
    resp.etag = str(digest)
    await resp.prepare(request)
    await resp.write_eof()
    return resp


async def delete_blob(request: web.Request) -> web.Response:
    local = request.app[LOCAL]
    repo = local.existing(request.match_info["name"], request.query.get("ns"))
    digest = Digest.parse(request.match_info["digest"])
    await local.delete_blob(repo, digest)
    return web.Response(status=202)
