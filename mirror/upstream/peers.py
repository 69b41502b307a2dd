"""The client side of peer streaming: a replica that follows another's fetch reads the bytes from that replica's
internal endpoint (``api.peer``), ``GET <advertise>/_mirror/v1/fetches/<registry>/<digest>?fetch=<id>``, with the
cluster's shared secret in ``SECRET_HEADER``. And of upload forwarding (``api.forward``): a request on an upload
session another replica holds is sent there (``forward``), its body streamed, its answer brought back.

Here because this package owns the mirror's outbound HTTP sessions: a lease holder is, for the replica following
it, the upstream of that one blob. One session per replica, made on first use and closed with the coordinator.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from mirror.oci.reference import Digest

SECRET_HEADER = "Mirror-Cluster-Secret"
PEER_PATH = "/_mirror/v1/fetches"
CONNECT_TIMEOUT = 5.0  # seconds: a replica that does not accept a connection by then is counted as gone
READ_TIMEOUT = 60.0  # seconds without a byte from the holder (its upstream may be slow, never that slow)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
ANSWER_MAX = 64 << 10  # bytes of a forwarded request's answer read (an upload's answers are headers, or an error)


class PeerMissing(Exception):
    """The replica runs no such fetch (404): it ended (the object may be complete in the bucket) or never ran."""


class PeerGone(Exception):
    """The replica could not be reached, refused, or cut the stream (it died, or its fetch failed)."""


@dataclass(frozen=True, slots=True)
class PeerBody:
    """A peer's answer: the blob's whole size and its bytes from the offset asked for."""

    size: int
    content: aiohttp.StreamReader


@dataclass(frozen=True, slots=True)
class Answer:
    """A replica's answer to a forwarded request."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class PeerClient:
    """Streams of other replicas' fetches. Owned by the fetch coordinator (``pull.leases``)."""

    def __init__(self, secret: str):
        self._secret = secret
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._session

    @asynccontextmanager
    async def stream(
        self, advertise: str, registry: str, digest: Digest, fetch_id: str, start: int = 0
    ) -> AsyncIterator[PeerBody]:
        """The bytes from ``start`` of the fetch ``fetch_id`` that the replica at ``advertise`` holds. Raises
        PeerMissing (404) or PeerGone (anything else that is not the bytes asked for)."""
        url = f"{advertise.rstrip('/')}{PEER_PATH}/{quote(registry, safe='')}/{digest}"
        headers = {SECRET_HEADER: self._secret}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            async with self._client().get(url, params={"fetch": fetch_id}, headers=headers) as resp:
                if resp.status == 404:
                    raise PeerMissing(f"{advertise} runs no fetch {fetch_id} of {digest}")
                yield PeerBody(_size(resp, start), resp.content)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerGone(f"stream of {digest} from {advertise}: {exc or type(exc).__name__}") from exc

    async def forward(
        self,
        advertise: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: AsyncIterable[bytes] | None,
    ) -> Answer:
        """Send a client's request to the replica at ``advertise`` (``path`` with its query); its answer, whose body
        is read up to ANSWER_MAX. Raises PeerGone when the replica cannot be reached or cuts the answer."""
        url = f"{advertise.rstrip('/')}{path}"
        try:
            async with self._client().request(
                method, url, headers={**headers, SECRET_HEADER: self._secret}, data=body
            ) as resp:
                data = bytearray()
                async for chunk in resp.content.iter_any():
                    data += chunk[: ANSWER_MAX - len(data)]
                    if len(data) >= ANSWER_MAX:
                        break
                return Answer(resp.status, resp.headers.copy(), bytes(data))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerGone(f"{method} {path} at {advertise}: {exc or type(exc).__name__}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _size(resp: aiohttp.ClientResponse, start: int) -> int:
    """The blob's whole size from an answer to a request for its bytes from ``start``; PeerGone if the answer is
    not those bytes."""
    if start == 0 and resp.status == 200 and resp.content_length is not None:
        return resp.content_length
    if start and resp.status == 206:
        found = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if found is not None and int(found[1]) == start and int(found[2]) == int(found[3]) - 1:
            return int(found[3])
    raise PeerGone(f"asked for bytes {start}-, the replica answered {resp.status}")
