"""``Range`` header parsing for blob GETs (RFC 9110 section 14): one byte range, or an error.

Clients resume cut blob downloads with ``Range: bytes=N-`` and need a 206. Anything malformed, multi-range, or
outside the blob gets a 416 with ``Content-Range: bytes */SIZE`` and a registry error body.
"""

from __future__ import annotations

import re

from mirror.oci.errors import RangeInvalid

# ASCII digits only (``\d`` would take "٣", which int() reads as 3 and aiohttp's own parser refuses).
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` with ``end`` exclusive, or None for a whole-body answer (no Range header)."""
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    unsatisfiable = RangeInvalid(
        f"range {header[:100]!r} is not satisfiable for a blob of {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
    if match is None:
        raise unsatisfiable
    first, last = match.groups()
    if not first and not last:
        raise unsatisfiable
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            raise unsatisfiable
        return max(0, size - length), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise unsatisfiable
    return start, end
