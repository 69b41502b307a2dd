"""Conditional requests on blobs (RFC 9110 section 13), decided once for every way a blob is sent.

A blob is immutable content named by its digest, and its ETag is that digest:

- ``If-Range`` (section 13.1.5) keeps a ``Range`` only when it names the digest's ETag exactly (a strong match);
  a weak or other ETag, or a date, gets the whole blob with 200: the cache's file times say nothing about the
  content, so a date is never a validator here.
- ``If-Match`` and ``If-Unmodified-Since`` are ignored, as registries do for blobs: the content at a digest
  cannot change, so there is nothing for a client to guard against (and no empty 412 is ever sent).
- ``If-None-Match`` is answered by the handler (304 when it names the digest).

``blob_range`` gives the range to send; ``for_file`` gives aiohttp's ``FileResponse`` a view of the request
without the headers decided here, so that it does not apply its own (mtime-based) rules to them.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from mirror.api.ranges import parse_range
from mirror.oci.reference import Digest

_DECIDED_HERE = (hdrs.IF_MATCH, hdrs.IF_UNMODIFIED_SINCE, hdrs.IF_RANGE)


def if_range_holds(header: str | None, etag: str) -> bool:
    """Whether an ``If-Range`` (absent: trivially) lets a ``Range`` apply to the blob whose ETag is ``etag``."""
    return header is None or header.strip() == f'"{etag}"'


def blob_range(request: web.BaseRequest, digest: Digest, size: int) -> tuple[int, int] | None:
    """The ``(start, end)`` to send (``end`` exclusive), or None for the whole blob; RangeInvalid (416) for a
    malformed or unsatisfiable range that applies."""
    if not if_range_holds(request.headers.get(hdrs.IF_RANGE), str(digest)):
        return None
    return parse_range(request.headers.get(hdrs.RANGE), size)


def for_file(request: web.BaseRequest, etag: str) -> web.BaseRequest:
    """The request as ``FileResponse`` should see it: without ``If-Match``/``If-Unmodified-Since``/``If-Range``,
    and without ``Range`` when ``If-Range`` does not hold."""
    if not any(name in request.headers for name in _DECIDED_HERE):
        return request
    headers = request.headers.copy()
    if not if_range_holds(headers.get(hdrs.IF_RANGE), etag):
        headers.popall(hdrs.RANGE, None)
    for name in _DECIDED_HERE:
        headers.popall(name, None)
    return request.clone(headers=headers)
