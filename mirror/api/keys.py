"""Typed application state (``web.AppKey``): the objects handlers reach through ``request.app``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiohttp import web

from mirror.access import Access
from mirror.metrics import Metrics
from mirror.notify import Notifier
from mirror.oci.reference import Repo
from mirror.pull.service import PullThrough
from mirror.push.registry import LocalRegistry
from mirror.routing import Upstreams
from mirror.storage.base import BlobStorage, RemoteBlobs
from mirror.storage.usage import Usage
from mirror.upstream.client import UpstreamClient

# name in the path, ?ns= -> the repository it means (``routing.Router.resolve``).
Resolver = Callable[[str, str | None], Repo]

METRICS = web.AppKey("metrics", Metrics)
PULL = web.AppKey("pull", PullThrough)
RESOLVE: web.AppKey[Resolver] = web.AppKey("resolve")
CLIENTS: web.AppKey[Mapping[str, UpstreamClient]] = web.AppKey("clients")  # one per upstream (wildcard hosts too)
ROUTING = web.AppKey("routing", Upstreams)  # the upstreams names are routed over (wildcard hosts included)

# Local pushes (mirror.push.registry): pushed repositories, the access policy, webhook notifications.
LOCAL = web.AppKey("local", LocalRegistry)
ACCESS = web.AppKey("access", Access)
NOTIFY = web.AppKey("notify", Notifier)
USAGE = web.AppKey("usage", Usage)  # leases: a blob being sent is never evicted
STORE: web.AppKey[BlobStorage] = web.AppKey("store")  # the blob store, through its protocol only
# Object storage ([storage] backend = "s3"): hits streamed from the bucket, or with redirect 307 to a presigned URL.
BUCKET: web.AppKey[RemoteBlobs | None] = web.AppKey("bucket")
REDIRECT: web.AppKey[bool] = web.AppKey("redirect")
