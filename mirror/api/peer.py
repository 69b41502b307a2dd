"""The replicas' internal endpoint: ``GET /_mirror/v1/fetches/<registry>/<digest>?fetch=<id>`` streams a fetch this
replica holds the lease of to another replica following it (``pull.leases``; the client is ``upstream.peers``).

Only replicas may call it: the request carries the cluster's shared secret (``SECRET_HEADER``), compared in constant
time. Without it, or with a wrong one, the answer is 401 UNAUTHORIZED with the plain default message: nothing about
the fetch, the digest or the secret. ``--htpasswd`` does not apply (``access.ACTIONS`` classifies the route as
``peer``); the secret does, whatever the access rules.

The bytes are the growing temp file, sent exactly as to this replica's own clients (``streaming.stream_fetch``):
all but the last byte until the digest is verified, the connection cut if the fetch fails, ``Range: bytes=N-``
for a follower reconnecting. 404 when this replica holds no such fetch: it ended (the follower looks in the bucket)
or it never ran here.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from mirror.api.keys import METRICS
from mirror.api.streaming import stream_fetch
from mirror.oci import errors
from mirror.oci.reference import Digest
from mirror.pull.inflight import FetchState
from mirror.upstream.peers import SECRET_HEADER


class HeldFetches(Protocol):
    def serving(self, registry: str, digest: Digest, fetch_id: str) -> FetchState | None: ...


@dataclass(frozen=True, slots=True)
class Peering:
    """What the endpoint needs: the shared secret and the fetches this replica holds (``pull.leases.Leased``)."""

    secret: str
    fetches: HeldFetches


PEERING = web.AppKey("peering", Peering)


def authorized(request: web.Request, secret: str) -> bool:
    given = request.headers.get(SECRET_HEADER, "")
    return hmac.compare_digest(given.encode(), secret.encode())


async def fetch_for_peer(request: web.Request) -> web.StreamResponse:
    peering = request.app[PEERING]
    if not authorized(request, peering.secret):
        raise errors.Unauthorized()
    digest = Digest.parse(request.match_info["digest"])
    registry = request.match_info["registry"]
    fetch = peering.fetches.serving(registry, digest, request.query.get("fetch", ""))
    if fetch is None:
        raise errors.BlobUnknown("no such fetch on this replica")
    try:
        await fetch.wait_started()
    except Exception:  # it failed before its first byte: the follower tries the lease again
        raise errors.BlobUnknown("no such fetch on this replica") from None
    if fetch.size is None:  # no Content-Length from the upstream: the follower waits for the object in the bucket
        raise errors.BlobUnknown("this fetch has no size to stream")
    request.app[METRICS].peer_streams_served.inc()
    # The last byte once the digest is verified, as to this replica's own clients: the follower verifies it too, and
    # its clients need not wait for the object to be complete in the bucket.
    return await stream_fetch(request, None, digest, fetch)
