"""Continuing a blob fetch that another process began and died in (``pull.filelock`` hands it over): the bytes it
left in the temp file are kept (re-hashed, in a thread, when ``BlobStore.fetch_writer`` reopens them) and the
upstream is asked for the rest only, with ``Range: bytes=N-``. The answer decides how the body continues the file:

- 206 with ``Content-Range: bytes N-(size-1)/size``: the body is the rest; it is appended.
- 200 (an upstream may ignore Range, RFC 9110 section 14.2): the body is the whole blob. Its first N bytes are
  hashed as they arrive, not written, and must hash to what the file holds; then the rest is appended. The file's
  bytes are then all the upstream's, so the clients already reading the file keep their place. If the first N
  bytes differ from the file's, the fetch fails at once (its clients are cut) instead of after the whole body.
- anything else: the fetch fails.

Either way the commit checks the digest over the file's bytes (the writer's hash state is the file's, rebuilt from
it), so a damaged partial file is never published and no client receives its last byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

import aiohttp

from mirror.storage.base import BlobWriterLike
from mirror.upstream.errors import UpstreamInvalid

PREFIX_BATCH = 1 << 20  # bytes of a 200's body hashed per thread hop while it is checked against the file
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


async def continue_body(resp: aiohttp.ClientResponse, writer: BlobWriterLike, size: int, fetched: Any) -> int:
    """Make ``resp``'s body continue the ``writer.written`` bytes in the file of a blob of ``size`` bytes; the
    bytes of the body still to come (all to be appended). ``fetched`` counts the bytes read here."""
    start = writer.written
    if resp.status == 206:
        found = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if found is None or tuple(map(int, found.groups())) != (start, size - 1, size):
            raise UpstreamInvalid(f"asked for bytes {start}- of {size}, the upstream sent {found and found[0]!r}")
        return size - start
    if resp.status != 200 or resp.content_length not in (None, size):
        raise UpstreamInvalid(f"asked for bytes {start}- of {size}: {resp.status}, {resp.content_length} bytes")
    await _check_prefix(resp.content, writer, fetched)
    return size - start


async def _check_prefix(content: aiohttp.StreamReader, writer: BlobWriterLike, fetched: Any) -> None:
    """Read as many bytes of a whole body as the file holds; they must hash to the file's bytes."""
    start, on_disk = writer.mark()
    hasher = hashlib.new(on_disk.name)
    left = start
    while left:
        try:
            chunk = await content.readexactly(min(left, PREFIX_BATCH))
        except asyncio.IncompleteReadError as exc:
            raise UpstreamInvalid(f"the upstream's body ended within the {start} bytes already fetched") from exc
        await asyncio.to_thread(hasher.update, chunk)
        fetched.inc(len(chunk))
        left -= len(chunk)
    if hasher.digest() != on_disk.digest():
        raise UpstreamInvalid(f"the upstream's first {start} bytes differ from those an interrupted fetch stored")
