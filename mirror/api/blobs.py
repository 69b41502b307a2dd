"""``GET``/``HEAD /v2/<name>/blobs/<digest>``: hits by sendfile, misses streamed from the fetch's temp file."""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Callable
from typing import IO, Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from mirror.api import sendfile
from mirror.api.conditional import blob_range, for_file
from mirror.api.content import content_for
from mirror.api.keys import LOCAL, METRICS, RESOLVE, USAGE
from mirror.inflight import Fetch
from mirror.oci.reference import Digest, Repo, validate_name
from mirror.pullthrough import MemoryBlob, StoredBlob, upstream_failure

log = logging.getLogger(__name__)
BLOB_TYPE = "application/octet-stream"
READ_CHUNK = 1 << 20  # bytes per read when the event loop cannot sendfile
# A client that has caught up with a fetch waits up to GATHER_WAIT for SEND_STEP more bytes before its next
# sendfile: a herd of clients on a fast fetch then makes a quarter of the calls (each one registers and
# unregisters the socket with epoll), while a slow upstream delays bytes by at most GATHER_WAIT.
SEND_STEP = 4 << 20
GATHER_WAIT = 0.02
_NO_SENDFILE: set[type] = set()  # event loop classes without loop.sendfile (uvloop)


class BlobFileResponse(web.FileResponse):
    """aiohttp's FileResponse (stat/open in a thread, sendfile, Range) with the digest as ETag, as registries
    send it, instead of aiohttp's mtime-based one."""

    def __init__(self, path: Any, digest: Digest, **kwargs: Any):
        super().__init__(path, **kwargs)
        self._digest_etag = str(digest)
        self._release: Callable[[], None] | None = None

    def release_after_send(self, release: Callable[[], None]) -> None:
        """Call ``release`` once the file is sent (or the response is dropped unsent)."""
        self._release = release
        weakref.finalize(self, release)

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int) -> AbstractStreamWriter:
        """aiohttp's own, but with the copying done by worker threads (``api.sendfile``) on plain connections."""
        transport = request.transport
        if transport is None or not sendfile.usable(transport):
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        await sendfile.send_file(transport, fobj, offset, count)
        await web.StreamResponse.write_eof(self)
        return writer

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(for_file(request, self._digest_etag))  # opens the file, sendfile
        finally:
            if self._release is not None:
                self._release()

    @property
    def etag(self) -> Any:
        return super().etag

    @etag.setter
    def etag(self, value: Any) -> None:
        web.FileResponse.etag.fset(self, self._digest_etag)  # type: ignore[attr-defined]


def blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Content-Type": BLOB_TYPE,
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
    }


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
    pull = content_for(request.app, repo)
    if request.method == "HEAD":
        source: StoredBlob | MemoryBlob | Fetch | int = await pull.blob_head(repo, digest)
    else:
        source = await pull.blob(repo, digest)
    if isinstance(source, int):  # HEAD of a blob we do not hold: the size the upstream announced
        resp = web.StreamResponse(headers=blob_headers(digest))
        resp.content_length = source
        resp.etag = str(digest)
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    if isinstance(source, Fetch) and source.size is None:
        # No Content-Length from the upstream: wait for the end and serve the file (rare; registries send it).
        await source.wait_beyond(1 << 62)
        if source.final_path is None:  # nothing was sent yet: a registry error (507 for a full disk), not a cut
            raise upstream_failure(source.error or RuntimeError("the fetch ended without a result"))
        source = StoredBlob(source.final_path, source.written)
    if isinstance(source, MemoryBlob):
        return memory_response(request, repo, digest, source.data)
    if isinstance(source, StoredBlob) and _etag_matches(request.headers.get(hdrs.IF_NONE_MATCH), digest):
        return web.Response(status=304, headers={**blob_headers(digest), "ETag": f'"{digest}"'})
    if isinstance(source, StoredBlob):
        rng = blob_range(request, digest, source.size)
        count = source.size if rng is None else rng[1] - rng[0]
        if request.method == "GET":
            request.app[METRICS].blob_bytes_served.labels(repo.registry, "cache").inc(count)
            request.app[METRICS].repos.served(str(repo), "cache", count)
        return BlobFileResponse(source.path, digest, headers=blob_headers(digest), chunk_size=1 << 20)
    return await stream_fetch(request, repo, digest, source)


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


async def stream_fetch(request: web.Request, repo: Repo, digest: Digest, fetch: Fetch) -> web.StreamResponse:
    """Send a blob that is still arriving: read the temp file up to what the fetch has written, wait for more,
    repeat; the last byte of the answer (whole blob or range) only after the digest is verified. If the fetch
    fails, the connection is cut, so the client sees a short body, never a complete wrong one."""
    assert fetch.size is not None
    rng = blob_range(request, digest, fetch.size)
    start, end = rng if rng is not None else (0, fetch.size)
    resp = web.StreamResponse(status=206 if rng else 200, headers=blob_headers(digest))
    resp.content_length = end - start
    resp.etag = str(digest)
    if rng is not None:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{fetch.size}"
    await resp.prepare(request)
    if request.method == "HEAD" or end == start:
        await resp.write_eof()
        return resp
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    offset = start
    loop = asyncio.get_running_loop()
    try:
        fileobj = await asyncio.to_thread(_open_fetch_file, fetch)
    except FileNotFoundError:
        # Either the fetch failed and removed its temp file, or it is between renaming the temp file into the
        # store and marking itself finished (small blobs hit this): wait for the outcome, then decide.
        await fetch.wait_beyond(fetch.size)
        try:
            fileobj = await asyncio.to_thread(_open_fetch_file, fetch)
        except FileNotFoundError:
            transport.abort()
            return resp
    try:
        while offset < end:
            await _wait_sendable(fetch, offset, offset > start, end)
            if fetch.error is not None:
                log.warning("cutting client off: fetch of %s failed: %s", digest, fetch.error)
                transport.abort()
                return resp
            available = min(fetch.readable(), _sendable_end(fetch, end))
            if available > offset:
                await send_part(loop, transport, resp, fileobj, offset, available - offset)
                request.app[METRICS].blob_bytes_served.labels(repo.registry, "upstream").inc(available - offset)
                request.app[METRICS].repos.served(str(repo), "upstream", available - offset)
                offset = available
    finally:
        await asyncio.to_thread(fileobj.close)
    await resp.write_eof()
    return resp


async def _wait_sendable(fetch: Fetch, offset: int, gather: bool, end: int) -> None:
    """Wait until bytes from ``offset`` of a range ending at ``end`` may be sent, or the fetch ended.

    A range's last byte is sent only once the whole blob is verified: ``Fetch.readable`` holds back the blob's
    last byte, which protects only ranges that include it; a range ending earlier would otherwise be completed
    with bytes whose digest is not yet known to be right."""
    if offset >= _sendable_end(fetch, end):
        await fetch.wait_done()
        return
    await fetch.wait_beyond(offset)
    if gather and fetch.readable() - offset < SEND_STEP:
        await _gather_more(fetch, min(offset + SEND_STEP, _sendable_end(fetch, end)))


def _sendable_end(fetch: Fetch, end: int) -> int:
    """Where the bytes of a range ending at ``end`` may be sent up to now: all of it once the blob is verified,
    all but its last byte before."""
    return end if fetch.final_path is not None else end - 1


async def _gather_more(fetch: Fetch, target: int) -> None:
    """Wait until ``target`` bytes are readable, the fetch ended, or GATHER_WAIT passed, whichever comes first."""
    try:
        async with asyncio.timeout(GATHER_WAIT):
            await fetch.wait_beyond(target - 1)
    except TimeoutError:
        pass


async def send_part(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    resp: web.StreamResponse,
    fileobj: IO[bytes],
    offset: int,
    count: int,
) -> None:
    """``count`` bytes of the file from ``offset`` to the client: sendfile where the loop has it, else (uvloop
    has no ``loop.sendfile``) reads of up to 1 MiB in a thread, so memory stays bounded."""
    if sendfile.usable(transport):
        await sendfile.send_file(transport, fileobj, offset, count)
        return
    if type(loop) not in _NO_SENDFILE:
        try:
            await loop.sendfile(transport, fileobj, offset, count)
            return
        except NotImplementedError:  # raised before any byte is sent
            _NO_SENDFILE.add(type(loop))
    fd = fileobj.fileno()
    while count > 0:
        data = await asyncio.to_thread(os.pread, fd, min(count, READ_CHUNK), offset)
        if not data:
            raise ConnectionResetError("temp file shorter than the fetch reported")
        await resp.write(data)
        offset += len(data)
        count -= len(data)


def _open_fetch_file(fetch: Fetch) -> IO[bytes]:
    """Open the growing temp file, or the final file if the fetch was committed (renamed) meanwhile."""
    assert fetch.temp_path is not None
    try:
        return open(fetch.temp_path, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        if fetch.final_path is None:
            raise
        return open(fetch.final_path, "rb")  # noqa: SIM115


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
