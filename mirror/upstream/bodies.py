"""Reading what an upstream sends, within bounds: no answer may take unbounded memory, disk or time.

Small answers (manifests, referrers, tag lists, token answers, error bodies) are read to the end into memory, up
to a limit each; blobs are streamed to disk (``pull.blobs._pump``) under a size bound and a ``Throughput`` floor.
The limits follow the OCI distribution spec where it gives one (manifests: "registries SHOULD accept manifests of
at least 4 MiB") and are generous elsewhere: they are there to stop a hostile or broken upstream, not to ration
a real one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from mirror.upstream.errors import UpstreamInvalid

MAX_MANIFEST = 4 << 20
MAX_REFERRERS = 4 << 20
MAX_TAG_LIST = 4 << 20  # about 100,000 tag names of 40 bytes
MAX_TOKEN = 256 << 10  # a token answer is a JWT or two and a few numbers
MAX_ERROR = 64 << 10  # an error body is a registry error list; past this it is not worth reading


class BodyTooLarge(UpstreamInvalid):
    """The upstream's answer is larger than the mirror accepts for its kind."""

    def __init__(self, what: str, limit: int, setting: str = ""):
        super().__init__(f"{what} larger than the limit of {limit} bytes" + (f" ({setting})" if setting else ""))
        self.limit = limit


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body of ``resp``, read to its end (``StreamReader.read(n)`` returns only what is buffered).

    Raises BodyTooLarge past ``limit`` bytes (announced by Content-Length, or counted while reading) and
    UpstreamInvalid for a body shorter than its Content-Length; aiohttp's ClientError and TimeoutError pass.
    """
    announced = resp.content_length
    if announced is not None and announced > limit:
        raise BodyTooLarge(what, limit)
    parts: list[bytes] = []
    size = 0
    while chunk := await resp.content.readany():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(what, limit)
        parts.append(chunk)
    if announced is not None and size < announced:
        raise UpstreamInvalid(f"{what} is {size} bytes, shorter than its Content-Length of {announced}")
    return b"".join(parts)


async def read_json(resp: aiohttp.ClientResponse, limit: int, what: str) -> Any:
    """``read_bounded``, parsed as JSON (ValueError if it is not JSON)."""
    return json.loads(await read_bounded(resp, limit, what))


async def read_error_body(resp: aiohttp.ClientResponse, within: float) -> Any:
    """The parsed JSON of an error answer, or None when it is not JSON, too large, cut or slower than
    ``within`` seconds: the status alone then says what happened."""
    try:
        async with asyncio.timeout(within):
            return await read_json(resp, MAX_ERROR, "error body")
    except (ValueError, UpstreamInvalid, aiohttp.ClientError, TimeoutError):
        return None


class TooSlow(TimeoutError):
    """A blob body arriving slower than the upstream's minimum rate (a drip, not a download)."""


class Throughput:
    """A floor under a stream's average rate: ``async with floor:`` around the reading, ``floor.advance(n)`` as
    bytes arrive. Each window of ``window`` seconds must bring at least ``min_rate * window`` bytes; the window
    restarts whenever it has, so a steady 1 MB/s against a floor of a few KiB/s is never cut, while an upstream
    that drips (or goes silent) is cut at the end of the window with ``TooSlow``. ``min_rate`` 0 turns it off."""

    def __init__(self, min_rate: float, window: float):
        self.min_rate = min_rate
        self.window = window
        self._quota = min_rate * window
        self._got = 0
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> Throughput:
        if self.min_rate > 0 and self.window > 0:
            self._timeout = asyncio.timeout(self.window)
            await self._timeout.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._timeout is None:
            return
        try:
            await self._timeout.__aexit__(*exc_info)
        except TimeoutError as exc:
            raise TooSlow(
                f"the upstream sent {self._got} bytes in {self.window:g} s, below the minimum of "
                f"{self.min_rate:g} bytes/s"
            ) from exc

    def advance(self, size: int) -> None:
        self._got += size
        if self._timeout is not None and self._got >= self._quota:
            self._got = 0
            self._timeout.reschedule(asyncio.get_running_loop().time() + self.window)
