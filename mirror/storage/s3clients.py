"""The bucket's settings and the two clients of it (see ``storage.s3``): aiobotocore's on the event loop, botocore's
synchronous one for threads and CLI processes; and ``KeyedLocks``, one asyncio lock per digest."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.config import Config as BotoConfig

from mirror.oci.reference import Digest

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client as AioS3Client
    from types_boto3_s3 import S3Client

POOL = 64  # connections to the bucket at once per client (botocore's default, 10, would queue a herd of hits)


@dataclass(frozen=True, slots=True)
class Bucket:
    """Where the content is and how to reach it (the ``[storage]`` table, as plain values)."""

    name: str
    endpoint_url: str | None = None  # None: AWS's endpoint for ``region``
    region: str = "us-east-1"
    prefix: str = ""
    access_key: str | None = None  # None: botocore's usual chain (AWS_ACCESS_KEY_ID, ...)
    secret_key: str | None = None


def _load_models(session: AioSession) -> None:
    """Read the JSON files botocore builds an S3 client from into the session's loader (it keeps them), so that
    making the client on the event loop reads no file."""
    loader = session.get_component("data_loader")
    for name in ("endpoints", "partitions", "sdk-default-configuration"):
        loader.load_data(name)
    for kind in ("service-2", "endpoint-rule-set-1"):
        loader.load_service_model("s3", kind)


class KeyedLocks:
    """One asyncio lock per digest, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Digest, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, digest: Digest) -> AsyncIterator[None]:
        lock, users = self._locks.get(digest, (asyncio.Lock(), 0))
        self._locks[digest] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[digest]
            if users == 1:
                del self._locks[digest]
            else:
                self._locks[digest] = (lock, users - 1)


class Clients:
    """The two clients of one bucket, each made on first use."""

    def __init__(self, bucket: Bucket):
        self.bucket = bucket
        self._aio: AioS3Client | None = None
        self._aio_exit = contextlib.AsyncExitStack()
        self._aio_lock = asyncio.Lock()
        self._sync: S3Client | None = None
        self._sync_lock = threading.Lock()

    async def aio(self) -> AioS3Client:
        """The event loop's client, made on first use."""
        async with self._aio_lock:
            if self._aio is None:
                session = get_session()
                await asyncio.to_thread(_load_models, session)  # file reads: off the loop
                config = AioConfig(
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 3, "mode": "standard"},
                    max_pool_connections=POOL,
                )
                made = session.create_client(
                    "s3",
                    endpoint_url=self.bucket.endpoint_url,
                    region_name=self.bucket.region,
                    aws_access_key_id=self.bucket.access_key,
                    aws_secret_access_key=self.bucket.secret_key,
                    config=config,
                )
                self._aio = client = await self._aio_exit.enter_async_context(made)
                return client
            return self._aio

    def sync(self) -> S3Client:
        """The client of threads and CLI processes, made on first use (botocore's clients are thread-safe)."""
        with self._sync_lock:
            if self._sync is None:
                config = BotoConfig(
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 3, "mode": "standard"},
                    max_pool_connections=POOL,
                )
                made = botocore.session.get_session().create_client(
                    "s3",
                    endpoint_url=self.bucket.endpoint_url,
                    region_name=self.bucket.region,
                    aws_access_key_id=self.bucket.access_key,
                    aws_secret_access_key=self.bucket.secret_key,
                    config=config,
                )
                self._sync = cast("S3Client", made)
            return self._sync

    async def close(self) -> None:
        await self._aio_exit.aclose()
        self._aio = None
        if self._sync is not None:
            self._sync.close()
