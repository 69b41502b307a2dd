"""Content in an S3-compatible bucket: the object storage implementation of ``base.BlobStorage``.

Layout of the bucket (``prefix`` from ``[storage]``, "" or ending in "/")::

    <prefix>blobs/
      sha256/
        ab12...ef              one object per digest: layers, configs and manifests alike, bytes exactly as
                               received; visible only once complete and verified (``s3writer``)
    <prefix>quarantine/
      <label>.<time>           objects that failed verification (``quarantine_sync``, called by gc.py)

The data dir keeps what is local to this replica: ``tmp/`` holds the temp file of every write (clients of a
fetch tail it, as with the disk store); ``blobs/`` is where the local tier (``storage.tier``, with ``local_cache``)
keeps copies of hot objects (``path``), served with sendfile.

Two clients share the bucket settings: aiobotocore's on the event loop, for the services; botocore's synchronous
one for the ``*_sync`` methods that gc, verify, eviction's sweeps and the CLI call from threads or processes
without a loop. botocore is what aiobotocore is built on (the same signing, retries, errors and models), and its
clients are thread-safe, so one client serves every thread: simpler and more correct than an event loop per
thread with a client bound to each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from mirror.oci.errors import DigestInvalid
from mirror.oci.reference import Digest
from mirror.storage.blobs import HASH_CHUNK, BlobStore, StoredFile
from mirror.storage.s3clients import Bucket as Bucket  # re-exported: the store is configured with one
from mirror.storage.s3clients import Clients, KeyedLocks
from mirror.storage.s3errors import bucket_errors
from mirror.storage.s3errors import missing as _missing
from mirror.storage.s3writer import S3Writer
from mirror.storage.tier import LocalTier

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client as AioS3Client
    from types_boto3_s3 import S3Client

PRESIGN_SECONDS = 900  # how long a presigned GET URL is valid
READ_CHUNK = 1 << 20  # bytes per chunk of a streamed GET

log = logging.getLogger(__name__)


class S3Store:
    """Content-addressed objects in a bucket. See the module docstring for the layout.

    As with the disk store, eviction removes an object in two steps (``withdraw`` on the loop, then
    ``remove_withdrawn``); a withdrawn digest is absent at once, and a publish of it cancels its removal (the two
    never interleave for one digest: ``KeyedLocks``).
    """

    def __init__(self, data_dir: Path, bucket: Bucket, local_cache: int = 0):
        self.local = BlobStore(data_dir)  # tmp/ for the temp files of writes; blobs/ for the local tier
        self.tier = LocalTier(self.local, local_cache) if local_cache else None
        self._fills: set[asyncio.Task[None]] = set()
        self.bucket = bucket
        self._blobs = f"{bucket.prefix}blobs/"
        self._clients = Clients(bucket)
        self._withdrawn: set[Digest] = set()
        self._publishing = KeyedLocks()

    # --- the two clients (``s3clients``) ---------------------------------------------------------------------------
    async def client(self) -> AioS3Client:
        """The event loop's client, made on first use."""
        return await self._clients.aio()

    def sync_client(self) -> S3Client:
        """The client of threads and CLI processes, made on first use (botocore's clients are thread-safe)."""
        return self._clients.sync()

    async def close(self) -> None:
        for task in list(self._fills):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._clients.close()

    # --- names ---------------------------------------------------------------------------------------------------
    @property
    def tmp_dir(self) -> Path:
        return self.local.tmp_dir

    @property
    def bucket_name(self) -> str:
        return self.bucket.name

    def key(self, digest: Digest) -> str:
        # Digest.parse admits only [a-f0-9] of a fixed length, so this stays under the prefix.
        return f"{self._blobs}{digest.algorithm}/{digest.hex}"

    def path(self, digest: Digest) -> Path:
        """Where the local tier keeps (or would keep) a copy of ``digest``; without one, no file is there."""
        return self.local.path(digest)

    # --- reads ---------------------------------------------------------------------------------------------------
    def size_sync(self, digest: Digest) -> int | None:
        if digest in self._withdrawn:
            return None
        try:
            return self.sync_client().head_object(Bucket=self.bucket.name, Key=self.key(digest))["ContentLength"]
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    async def size(self, digest: Digest) -> int | None:
        if digest in self._withdrawn:
            return None  # being evicted: a miss, fetched again (and the new publish cancels the removal)
        client = await self.client()
        try:
            with bucket_errors():
                return (await client.head_object(Bucket=self.bucket.name, Key=self.key(digest)))["ContentLength"]
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    async def stream(self, digest: Digest, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """The bytes ``start``..``end`` (exclusive; None: to the end) of a stored blob, a chunk at a time, from one
        ranged GET. Raises FileNotFoundError when it is not stored."""
        if digest in self._withdrawn:
            raise FileNotFoundError(str(digest))
        client = await self.client()
        key = self.key(digest)
        try:
            with bucket_errors():
                if start or end is not None:  # not for a whole blob: "bytes=0-" of an empty object is a 416
                    span = f"bytes={start}-{'' if end is None else end - 1}"
                    resp = await client.get_object(Bucket=self.bucket.name, Key=key, Range=span)
                else:
                    resp = await client.get_object(Bucket=self.bucket.name, Key=key)
        except ClientError:  # bucket_errors lets only a missing key through
            raise FileNotFoundError(str(digest)) from None
        async with resp["Body"] as body:
            async for chunk in body.iter_chunks(READ_CHUNK):
                yield chunk

    async def read(self, digest: Digest) -> bytes | None:
        """Whole content of a small blob (manifests; layers are streamed)."""
        try:
            return b"".join([chunk async for chunk in self.stream(digest)])
        except FileNotFoundError:
            return None

    async def read_verified(self, digest: Digest) -> bytes | None:
        """Whole content of a small blob, checked against its digest (None if missing or damaged)."""
        data = await self.read(digest)
        if data is not None and hashlib.new(digest.algorithm, data).hexdigest() != digest.hex:
            log.error("object of %s in the bucket does not match its digest; run `mirror verify`", digest)
            return None
        return data

    def read_sync(self, digest: Digest) -> bytes | None:
        if digest in self._withdrawn:
            return None
        try:
            resp = self.sync_client().get_object(Bucket=self.bucket.name, Key=self.key(digest))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        with contextlib.closing(resp["Body"]) as body:
            return body.read()

    async def abort_uploads(self, digest: Digest) -> int:
        """Abort the unfinished multipart uploads of ``digest``'s object (a replica that died mid-fetch left its
        parts there, invisible but stored); how many. Called by the replica that takes such a fetch over, before
        it starts its own."""
        client, key = await self.client(), self.key(digest)
        with bucket_errors():
            listed = await client.list_multipart_uploads(Bucket=self.bucket.name, Prefix=key)
            uploads = [u["UploadId"] for u in listed.get("Uploads", []) if u.get("Key") == key and "UploadId" in u]
            for upload_id in uploads:
                await client.abort_multipart_upload(Bucket=self.bucket.name, Key=key, UploadId=upload_id)
        return len(uploads)

    async def presigned_url(self, digest: Digest, expires: int = PRESIGN_SECONDS) -> str:
        """A URL that GETs the object without credentials for ``expires`` seconds (``redirect = true``)."""
        client = await self.client()
        params = {"Bucket": self.bucket.name, "Key": self.key(digest)}
        return await client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)

    # --- the local tier ------------------------------------------------------------------------------------------
    def local_copy(self, digest: Digest) -> Path | None:
        """On the loop: the local tier's copy of a stored object, to send instead of reading the bucket."""
        if self.tier is None or digest in self._withdrawn:
            return None
        return self.tier.copy(digest)

    def warm(self, digest: Digest, size: int) -> None:
        """``digest`` is being read from the bucket: fill its local copy in the background (verified)."""
        if self.tier is None or not self.tier.wanted(digest, size):
            return
        task = asyncio.get_running_loop().create_task(self._fill(digest), name=f"local copy of {digest}")
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill(self, digest: Digest) -> None:
        assert self.tier is not None
        try:
            async with contextlib.aclosing(self.stream(digest)) as chunks:
                await self.tier.fill(digest, chunks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a lost speed-up, never a wrong answer: the bucket is still read
            log.warning("no local copy of %s: %s", digest, exc)

    def retain_sync(self, temp_path: Path, digest: Digest, size: int) -> None:
        if self.tier is not None:
            self.tier.keep_sync(temp_path, digest, size)

    def _drop_copy_sync(self, digest: Digest) -> None:
        if self.tier is not None:
            self.tier.drop_sync(digest)

    def load_tier_sync(self) -> None:
        """At start-up: the local copies a previous run left (blocking)."""
        if self.tier is not None:
            self.tier.load_sync()

    def open_growing(self, temp_path: Path, digest: Digest) -> IO[bytes]:
        """The temp file of a blob being written; once the object is complete (the temp file removed), a copy of
        it in an unnamed temp file. Raises FileNotFoundError when neither is there. Blocking: call it in a
        thread. The caller closes the file."""
        try:
            return open(temp_path, "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            pass
        if self.tier is not None and self.tier.copy(digest) is not None:
            with contextlib.suppress(FileNotFoundError):
                return open(self.local.path(digest), "rb")  # noqa: SIM115 - closed by the caller
        try:
            resp = self.sync_client().get_object(Bucket=self.bucket.name, Key=self.key(digest))
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(str(temp_path)) from None
            raise
        copy = tempfile.TemporaryFile(dir=self.tmp_dir)  # noqa: SIM115 - closed by the caller
        with contextlib.closing(resp["Body"]) as body:
            for chunk in body.iter_chunks(READ_CHUNK):
                copy.write(chunk)
        copy.seek(0)
        return copy

    # --- writes --------------------------------------------------------------------------------------------------
    def writer(self, algorithm: str = "sha256") -> S3Writer:
        return S3Writer(self, algorithm)

    def fetch_writer(self, registry: str, digest: Digest, resume: bool = False) -> S3Writer:
        """The writer of an upstream fetch, its temp file named as the disk store names it (``fetch_temp_path``);
        a file already there is a leftover of an interrupted fetch of the same key, removed first; with ``resume``
        (a replica taking over the fetch of one that died, ``pull.leases``) it holds the bytes streamed from that
        replica so far, continued. Blocking: call it in a thread."""
        path = self.local.fetch_temp_path(registry, digest)
        if not resume:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return S3Writer(self, digest.algorithm, name=path.name, digest=digest, resume=resume)

    async def put(self, data: bytes, expected: Digest | None = None) -> Digest:
        """Store a small blob held in memory (a manifest), verified like any other."""
        writer = await asyncio.to_thread(self.writer, expected.algorithm if expected else "sha256")
        await writer.write(data)
        return await writer.commit(expected, len(data))

    async def publish_file(self, temp_path: Path, digest: Digest) -> None:
        """A verified local file (a push upload's data) becomes the object of ``digest``: read back into a multipart
        upload, hashed again as it is read, completed only if it still matches (``S3Writer`` with ``source``).
        The file is removed either way."""
        writer = await asyncio.to_thread(S3Writer, self, digest.algorithm, source=temp_path)
        await writer.commit(digest)

    async def publish(self, digest: Digest, complete: Callable[[], Awaitable[None]]) -> None:
        """Run a writer's last requests: from their end on ``digest`` is stored, and a removal of it withdrawn
        before (eviction) is cancelled."""
        async with self._publishing.hold(digest):
            await complete()
            self._withdrawn.discard(digest)

    async def delete(self, digest: Digest) -> bool:
        """Remove a stored blob; False if it was not there."""
        if await self.size(digest) is None:
            return False
        client = await self.client()
        with bucket_errors():
            await client.delete_object(Bucket=self.bucket.name, Key=self.key(digest))
        await asyncio.to_thread(self._drop_copy_sync, digest)
        return True

    def delete_sync(self, digest: Digest) -> bool:
        self._drop_copy_sync(digest)
        if self.size_sync(digest) is None:
            return False
        self.sync_client().delete_object(Bucket=self.bucket.name, Key=self.key(digest))
        return True

    # --- eviction: withdraw on the loop, remove later ------------------------------------------------------------
    def withdraw(self, digest: Digest) -> None:
        """Make ``digest`` absent at once, ahead of ``remove_withdrawn`` (see ``BlobStore.withdraw``)."""
        self._withdrawn.add(digest)

    async def remove_withdrawn(self, digests: Iterable[Digest]) -> list[Digest]:
        """Delete the objects of withdrawn digests; the ones removed (not published again meanwhile)."""
        client = await self.client()
        removed = []
        for digest in digests:
            async with self._publishing.hold(digest):
                if digest not in self._withdrawn:
                    continue  # published again since it was withdrawn: the new object stays
                try:
                    await client.delete_object(Bucket=self.bucket.name, Key=self.key(digest))
                except Exception as exc:
                    log.warning("cannot remove %s: %s", digest, exc)
                    continue
                finally:
                    self._withdrawn.discard(digest)
            await asyncio.to_thread(self._drop_copy_sync, digest)
            removed.append(digest)
        return removed

    # --- housekeeping: walk, verify, quarantine (synchronous: callers run them in a thread) -----------------------
    def walk_sync(self) -> Iterator[StoredFile]:
        """Every object under ``<prefix>blobs/`` (list_objects_v2, a page at a time), with its size and time."""
        pages = (
            self.sync_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket.name, Prefix=self._blobs)
        )
        for page in pages:
            for item in page.get("Contents", []):
                location = item["Key"][len(self._blobs) :]
                algorithm, _, name = location.partition("/")
                try:
                    key = str(Digest.parse(f"{algorithm}:{name}"))
                except Exception:
                    key = ""  # not a digest's name or place: gc quarantines it
                yield StoredFile(key, location, item["Size"], item["LastModified"].timestamp())

    def intact_sync(self, digest: Digest) -> bool | None:
        """Re-hash a stored object, streaming: True if it matches its digest, False if damaged, None if gone."""
        hasher = hashlib.new(digest.algorithm)
        try:
            resp = self.sync_client().get_object(Bucket=self.bucket.name, Key=self.key(digest))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        with contextlib.closing(resp["Body"]) as body:
            for chunk in body.iter_chunks(HASH_CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest() == digest.hex

    def quarantine_sync(self, location: str, label: str) -> str:
        """Move the object at ``location`` (from ``walk_sync``) to ``<prefix>quarantine/``, named after ``label``
        (a server-side copy, then a delete); where it went, for the log."""
        client = self.sync_client()
        target = f"{self.bucket.prefix}quarantine/{label.replace(':', '-')}.{int(time.time())}"
        client.copy_object(
            Bucket=self.bucket.name, Key=target, CopySource={"Bucket": self.bucket.name, "Key": self._blobs + location}
        )
        client.delete_object(Bucket=self.bucket.name, Key=self._blobs + location)
        algorithm, _, name = location.partition("/")
        with contextlib.suppress(DigestInvalid):  # a stray key has no copy
            self._drop_copy_sync(Digest.parse(f"{algorithm}:{name}"))
        return f"s3://{self.bucket.name}/{target}"

    # --- the local side: temp files, readiness, space -------------------------------------------------------------
    def sweep_tmp_sync(self, max_age: float, dry_run: bool = False) -> int:
        return self.local.sweep_tmp_sync(max_age, dry_run)

    def clean_tmp(self) -> int:
        return self.local.clean_tmp()

    def probe_sync(self) -> None:
        """Readiness: temp files can be written and the bucket answers (raises otherwise)."""
        self.local.probe_sync()
        try:
            self.sync_client().head_bucket(Bucket=self.bucket.name)
        except (BotoCoreError, ClientError) as exc:
            raise OSError(errno.EIO, f"bucket {self.bucket.name} cannot be reached: {exc}") from exc

    async def check_space(self, size: int | None) -> None:
        """Raise DiskFull before a write the local disk cannot take: every write passes through a temp file."""
        await self.local.check_space(size)

    async def free_space(self) -> int:
        return await self.local.free_space()
