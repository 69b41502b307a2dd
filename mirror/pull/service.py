"""The pull-through service: manifests, tags and blobs from the store, or from the upstream on a miss.

Contract with the HTTP layer: it asks for a blob, a manifest or a tag list of a ``Repo`` and gets either stored
content or a ``Fetch`` to stream; it never learns whether an upstream was asked (the ``stale`` flag aside).

Cache semantics:
- Content by digest (blobs, manifests) is immutable: stored once, never revalidated.
- A tag maps to a digest for ``tag_ttl`` seconds; after that one upstream ``HEAD`` revalidates it (HEADs do not
  count against Docker Hub's pull limit) and only a changed digest costs a manifest ``GET``.
- Stale-if-error: when the upstream is unreachable, slow past ``timeout``, or answers 5xx/429, the last known
  digest of a tag is served (``stale=True``) if it is younger than ``max_stale`` (0: no limit).
- Rate-limit saving: while the upstream's quota is low or it has just answered 429 (``UpstreamClient.quota``),
  known tags are served without revalidation; only content the cache lacks goes upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
from aiocache import SimpleMemoryCache
from cachetools import LRUCache

from mirror.inflight import Coalescer, Fetch, InFlight
from mirror.metrics import Metrics
from mirror.oci import errors
from mirror.oci.mediatypes import DEFAULT_ACCEPT, MANIFEST_TYPES, accepts, names_every_type, upstream_accept
from mirror.oci.reference import Digest, Repo, Tag
from mirror.storage.base import BlobStorage, BlobWriterLike, MetadataIndex, UsageRecorder
from mirror.storage.blobs import DiskFull
from mirror.storage.index import ManifestRecord, TagRecord
from mirror.storage.usage import NullUsage
from mirror.upstream.bodies import BodyTooLarge, Throughput, TooSlow
from mirror.upstream.client import ManifestHead, UpstreamClient
from mirror.upstream.errors import UpstreamError, UpstreamInvalid, UpstreamUnreachable

log = logging.getLogger(__name__)
WRITE_BATCH = 1 << 20  # bytes gathered from the upstream before one write to the temp file
WRITE_AHEAD = 8  # batches read from the upstream while earlier ones are still being written (and hashed)
MEMORY_TTL = 30.0  # seconds a tag record stays in memory before the index is read again
# Hot content kept in memory, bounded in bytes (least recently used out first): manifests, and blobs up to
# SMALL_BLOB bytes (image configs, tiny layers), which are then answered without a thread hop or a sendfile.
MANIFEST_MEMORY_BYTES = 32 << 20
SMALL_BLOB = 64 << 10
SMALL_BLOB_MEMORY_BYTES = 32 << 20
VOUCHED_MEMORY = 1 << 16  # (registry, digest) pairs known to be servable under that registry's names
EVERY_MANIFEST_TYPE = ", ".join((*DEFAULT_ACCEPT, *sorted(MANIFEST_TYPES - set(DEFAULT_ACCEPT))))
PULLED_MEMORY = 4096  # repositories remembered as marked pulled-through (a miss costs one idempotent index write)


@dataclass(frozen=True, slots=True)
class TagPolicy:
    tag_ttl: float = 300.0
    max_stale: float = 0.0  # 0: serve stale tags however old
    timeout: float = 10.0  # longest a client waits on the upstream before a stale answer


@dataclass(frozen=True, slots=True)
class StoredBlob:
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class MemoryBlob:
    """A small blob answered from memory (verified against its digest when it was read from disk)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    digest: Digest
    media_type: str
    data: bytes
    stale: bool = False


def upstream_failure(exc: BaseException) -> errors.RegistryError:
    """The registry error a client sees when the upstream could not answer (404s are mapped by the caller)."""
    if isinstance(exc, UpstreamError):
        if exc.status == 429:
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
            return errors.TooManyRequests("the upstream registry is rate limiting the mirror", headers=headers)
        if exc.status in (401, 403):
            return errors.Denied(
                f"the upstream refused access ({exc.status}): the repository does not exist or the mirror's "
                "credentials for it are missing or wrong",
                detail={"upstream_status": exc.status, "upstream_errors": exc.errors},
            )
        if exc.status >= 500:
            return errors.UpstreamUnavailable(
                f"the upstream answered {exc.status}", detail={"upstream_status": exc.status}
            )
        return errors.UpstreamBadGateway(
            str(exc), detail={"upstream_status": exc.status, "upstream_errors": exc.errors}
        )
    if isinstance(exc, UpstreamInvalid):
        return errors.UpstreamBadGateway(f"the upstream sent invalid content: {exc}")
    if isinstance(exc, DiskFull):
        return errors.InsufficientStorage(f"the mirror's disk is full; the content was not cached: {exc}")
    if isinstance(exc, TooSlow):
        return errors.UpstreamUnavailable(f"the upstream is too slow: {exc}")
    if isinstance(exc, UpstreamUnreachable | TimeoutError | aiohttp.ClientError | OSError):
        return errors.UpstreamUnavailable(f"the upstream registry could not be reached: {str(exc) or 'timed out'}")
    return errors.RegistryError(f"fetch failed: {exc!r}")


def _unknown(repo: Repo, digest: Digest, kind: str) -> errors.RegistryError:
    if kind == "blob":
        return errors.BlobUnknown(f"blob {digest} is not in {repo}", detail={"digest": str(digest)})
    return errors.ManifestUnknown(
        f"manifest {digest} is not in {repo}", detail={"name": repo.path, "reference": str(digest)}
    )


def _retryable(exc: BaseException) -> bool:
    """Failures after which a stale answer is better than an error."""
    if isinstance(exc, UpstreamError):
        return exc.unavailable
    return isinstance(exc, UpstreamUnreachable | TimeoutError)


class PullThrough:
    def __init__(
        self,
        store: BlobStorage,
        index: MetadataIndex,
        upstreams: Mapping[str, UpstreamClient],
        policies: Mapping[str, TagPolicy],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        usage: UsageRecorder | None = None,
        cache_size: int = 0,  # the cache's cap (0: none): a blob without Content-Length may not grow past it
    ):
        self._cache_size = cache_size
        self._store = store
        self._usage: UsageRecorder = usage or NullUsage()
        self._index = index
        self._upstreams = upstreams
        self._policies = policies
        self._metrics = metrics
        self._clock = clock
        self.inflight = InFlight()
        self._tags: SimpleMemoryCache = SimpleMemoryCache(timeout=None)
        self._manifests: LRUCache[Digest, tuple[str, bytes]] = LRUCache(
            MANIFEST_MEMORY_BYTES, getsizeof=lambda item: len(item[1])
        )
        self._small_blobs: LRUCache[Digest, bytes] = LRUCache(SMALL_BLOB_MEMORY_BYTES, getsizeof=len)
        self._pulled: LRUCache[Repo, bool] = LRUCache(PULLED_MEMORY)  # repositories known to be marked pulled
        self._vouched: LRUCache[tuple[str, Digest], bool] = LRUCache(VOUCHED_MEMORY)  # see _vouch
        self._coalesce_tag: Coalescer[tuple[TagRecord, ManifestAnswer | None]] = Coalescer()
        self._coalesce_manifest: Coalescer[ManifestAnswer] = Coalescer()

    async def close(self) -> None:
        await self.inflight.close()

    def _client(self, repo: Repo) -> UpstreamClient:
        client = self._upstreams.get(repo.registry)
        if client is None:
            raise errors.NameUnknown(f"registry {repo.registry!r} is not configured as an upstream")
        return client

    async def _mark_pulled(self, repo: Repo) -> None:
        """Record that content was fetched upstream under ``repo``: from then on a push may not shadow the name
        (``push.LocalRegistry.target``), whether the pull was by tag or by digest only."""
        if repo not in self._pulled:
            await self._index.mark_pulled(repo)
            self._pulled[repo] = True

    async def _vouch(self, repo: Repo, digest: Digest, kind: str) -> None:
        """Stored content is answered under a pull-through name only if that name's upstream sent it (or holds
        it): pushed content stays private to its local repositories, and content of one upstream is never served
        through another upstream's names by digest. Known pairs are remembered in memory (origins only grow);
        otherwise the index decides (``Index.may_serve``), and when it cannot, the upstream is asked with a HEAD
        (HEADs do not count against Docker Hub's pull limit). Raises BLOB_UNKNOWN / MANIFEST_UNKNOWN when the
        upstream does not hold it."""
        key = (repo.registry, digest)
        if self._vouched.get(key) or await self._index.may_serve(digest, repo.registry):
            self._vouched[key] = True
            return
        client = self._client(repo)
        try:
            async with asyncio.timeout(self._policy(repo).timeout):
                if kind == "blob":
                    await client.head_blob(repo.path, digest)
                else:
                    await client.head_manifest(repo.path, str(digest), EVERY_MANIFEST_TYPE)
        except UpstreamError as exc:
            if exc.status == 404:
                raise _unknown(repo, digest, kind) from None
            raise upstream_failure(exc) from None
        except (UpstreamUnreachable, UpstreamInvalid, TimeoutError) as exc:
            raise upstream_failure(exc) from None
        await self._index.add_origin(digest, repo.registry)
        self._vouched[key] = True

    def _count(self, repo: Repo, kind: str, result: str) -> None:
        self._metrics.cache_requests.labels(repo.registry, kind, result).inc()
        self._metrics.repos.count(str(repo), kind, result)

    # --- blobs: THE miss path --------------------------------------------------------------------------------
    async def blob(self, repo: Repo, digest: Digest) -> StoredBlob | MemoryBlob | Fetch:
        """A stored blob (hit), or the fetch a client streams from (miss; joined if one is under way)."""
        hot = self._small_blobs.get(digest)
        if hot is not None:
            await self._vouch(repo, digest, "blob")
            self._count(repo, "blob", "hit")
            self._usage.touch(digest)
            return MemoryBlob(hot)
        size = await self._store.size(digest)
        if size is not None:
            await self._vouch(repo, digest, "blob")
        if size is not None and size > SMALL_BLOB:
            self._count(repo, "blob", "hit")
            self._usage.touch(digest)
            return StoredBlob(self._store.path(digest), size)
        if size is not None:
            data = await self._store.read_verified(digest)
            if data is not None:
                self._count(repo, "blob", "hit")
                self._usage.touch(digest)
                self._small_blobs[digest] = data
                return MemoryBlob(data)
            await self._store.delete(digest)  # damaged on disk (logged): fetched again below
        client = self._client(repo)
        fetch, started = self.inflight.join(repo.registry, digest, lambda f: self._fetch_blob(client, repo, f))
        self._count(repo, "blob", "miss")
        if not started:
            self._metrics.coalesced_waiters.labels(repo.registry).inc()
        try:
            await fetch.wait_started()
        except errors.RegistryError:
            raise
        except UpstreamError as exc:
            if exc.status == 404:
                raise errors.BlobUnknown(f"blob {digest} is not in {repo}", detail={"digest": str(digest)}) from None
            raise upstream_failure(exc) from None
        except Exception as exc:
            raise upstream_failure(exc) from None
        await self._mark_pulled(repo)
        if fetch.final_path is not None and fetch.written == 0 and fetch.size is None:
            # Finished before we looked (committed by someone else meanwhile): serve it as a hit.
            return StoredBlob(fetch.final_path, self._store.size_sync(digest) or 0)
        return fetch

    async def blob_head(self, repo: Repo, digest: Digest) -> StoredBlob | MemoryBlob | Fetch | int:
        """What a HEAD needs: the stored blob, the fetch under way, or the size the upstream announces. A HEAD
        never starts a download."""
        hot = self._small_blobs.get(digest)
        if hot is not None:
            await self._vouch(repo, digest, "blob")
            return MemoryBlob(hot)
        size = await self._store.size(digest)
        if size is not None:
            await self._vouch(repo, digest, "blob")
            return StoredBlob(self._store.path(digest), size)
        fetch = self.inflight.get(repo.registry, digest)
        if fetch is not None and fetch.size is not None:
            return fetch
        try:
            async with asyncio.timeout(self._policy(repo).timeout):
                return await self._client(repo).head_blob(repo.path, digest)
        except UpstreamError as exc:
            if exc.status == 404:
                raise errors.BlobUnknown(f"blob {digest} is not in {repo}", detail={"digest": str(digest)}) from None
            raise upstream_failure(exc) from None
        except (UpstreamUnreachable, UpstreamInvalid, TimeoutError) as exc:
            raise upstream_failure(exc) from None

    async def _fetch_blob(self, client: UpstreamClient, repo: Repo, fetch: Fetch) -> None:
        """Runs as the fetch's own task: upstream -> temp file (hashed on the fly) -> verify -> rename."""
        digest = fetch.digest
        if await self._store.size(digest) is not None:  # committed between the caller's check and join()
            await self._vouch(repo, digest, "blob")
            fetch.finish(self._store.path(digest))
            return
        self._metrics.inflight_fetches.inc()
        writer = await asyncio.to_thread(self._store.writer, digest.algorithm)
        expected: int | None = None
        try:
            # A Content-Length past max_blob_size is refused by client.blob before any byte is read.
            async with client.blob(repo.path, digest) as resp:
                await self._store.check_space(resp.content_length)  # DiskFull -> a clear 507, not a cut body
                bound = await self._size_bound(client, resp.content_length)
                self._usage.expect(expected := resp.content_length)
                fetch.begin(resp.content_length, writer.temp_path)
                floor = Throughput(client.settings.min_rate, client.settings.rate_window)
                fetched = self._metrics.upstream_bytes_fetched.labels(repo.registry)
                await _pump(resp.content, writer, fetch, fetched, floor, bound)
            try:
                await writer.commit(digest, fetch.size)
            except Exception as exc:
                raise UpstreamInvalid(f"blob {digest} from {repo}: {exc}") from exc
            await self._index.add_origin(digest, repo.registry)
            await self._usage.added(digest, fetch.written, "blob", str(repo))
            fetch.finish(self._store.path(digest))
            log.info("cached blob %s (%d bytes) from %s", digest, fetch.written, repo)
        except BaseException as exc:
            await writer.abort()
            fetch.fail(exc)
            log.warning("fetch of blob %s from %s failed: %s", digest, repo, exc)
            raise
        finally:
            self._usage.expect(-expected if expected else None)
            self._metrics.inflight_fetches.dec()

    async def _size_bound(self, client: UpstreamClient, announced: int | None) -> tuple[int, Exception]:
        """How far a body may grow, and the error past that: its Content-Length (aiohttp reads no further), or
        without one the least of max_blob_size, the cache's cap and the disk's free space."""
        if announced is not None:
            return announced, UpstreamInvalid("body longer than its Content-Length")
        bounds: list[tuple[int, Exception]] = [
            (client.settings.max_blob_size, BodyTooLarge("blob", client.settings.max_blob_size, "max_blob_size")),
            (
                free := await self._store.free_space(),
                DiskFull(f"blob without Content-Length outgrew the {free} bytes free"),
            ),
        ]
        if self._cache_size:
            bounds.append((self._cache_size, DiskFull(f"blob larger than the whole cache ({self._cache_size} bytes)")))
        return min(bounds, key=lambda bound: bound[0])

    # --- manifests -------------------------------------------------------------------------------------------
    async def manifest(self, repo: Repo, ref: Tag | Digest, accepted: frozenset[str]) -> ManifestAnswer:
        if isinstance(ref, Digest):
            return await self._manifest_by_digest(repo, ref)
        record, answer, stale = await self._resolve_tag(repo, ref, accepted, want_body=True)
        if answer is None:
            answer = await self._manifest_by_digest(repo, record.digest)
        return ManifestAnswer(answer.digest, answer.media_type, answer.data, stale)

    async def manifest_head(self, repo: Repo, ref: Tag | Digest, accepted: frozenset[str]) -> tuple[ManifestHead, bool]:
        """Digest, media type and size of a manifest, without fetching its body upstream when it is not stored."""
        if isinstance(ref, Digest):
            answer = await self._manifest_by_digest(repo, ref)
            return ManifestHead(answer.digest, answer.media_type, len(answer.data)), False
        record, _, stale = await self._resolve_tag(repo, ref, accepted, want_body=False)
        self._usage.touch(record.digest)
        return ManifestHead(record.digest, record.media_type, record.size), stale

    async def _stored_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        hot = self._manifests.get(digest)
        if hot is not None:
            return hot
        record = await self._index.get_manifest(digest)
        if record is None:
            return None
        data = await self._store.read(digest)
        if data is None:
            return None
        self._remember(digest, record.media_type, data)
        return record.media_type, data

    def _remember(self, digest: Digest, media_type: str, data: bytes) -> None:
        if len(data) <= MANIFEST_MEMORY_BYTES // 8:
            self._manifests[digest] = (media_type, data)

    async def _manifest_by_digest(self, repo: Repo, digest: Digest) -> ManifestAnswer:
        stored = await self._stored_manifest(digest)
        if stored is not None:
            await self._vouch(repo, digest, "manifest")
            self._count(repo, "manifest", "hit")
            self._usage.touch(digest)
            return ManifestAnswer(digest, stored[0], stored[1])
        self._count(repo, "manifest", "miss")
        answer, _ = await self._coalesce_manifest.run(
            (repo.registry, digest), lambda: self._fetch_manifest(repo, str(digest), frozenset())
        )
        await self._mark_pulled(repo)  # a joined caller may have asked under another name
        return answer

    async def _fetch_manifest(self, repo: Repo, ref: str, accepted: frozenset[str]) -> ManifestAnswer:
        """GET a manifest upstream, verify it, store it by digest. Raises registry errors."""
        client = self._client(repo)
        # By digest the content is fixed whatever we accept, so accept every type we know.
        accept = upstream_accept(accepted) if ":" not in ref else EVERY_MANIFEST_TYPE
        try:
            async with asyncio.timeout(self._policy(repo).timeout):
                head, data = await client.get_manifest(repo.path, ref, accept)
        except UpstreamError as exc:
            if exc.status == 404:
                raise errors.ManifestUnknown(
                    f"manifest {ref} is not in {repo}", detail={"name": repo.path, "reference": ref}
                ) from None
            raise upstream_failure(exc) from None
        except (UpstreamUnreachable, UpstreamInvalid, TimeoutError) as exc:
            raise upstream_failure(exc) from None
        try:
            await self._store.put(data, head.digest)
        except DiskFull as exc:
            raise upstream_failure(exc) from None
        await self._index.put_manifest(head.digest, ManifestRecord(head.media_type, len(data)))
        await self._index.add_origin(head.digest, repo.registry)
        await self._usage.added(head.digest, len(data), "manifest", str(repo))
        await self._mark_pulled(repo)
        self._remember(head.digest, head.media_type, data)
        return ManifestAnswer(head.digest, head.media_type, data)

    def _policy(self, repo: Repo) -> TagPolicy:
        return self._policies.get(repo.registry) or TagPolicy()

    # --- tags ------------------------------------------------------------------------------------------------
    async def _tag_record(self, repo: Repo, tag: Tag) -> TagRecord | None:
        key = (repo.registry, repo.path, tag.name)
        record = await self._tags.get(key)
        if isinstance(record, TagRecord):
            return record
        record = await self._index.get_tag(repo, tag.name)
        if record is not None:
            await self._tags.set(key, record, ttl=MEMORY_TTL)
        return record

    async def _save_tag(self, repo: Repo, tag: Tag, record: TagRecord) -> None:
        await self._index.put_tag(repo, tag.name, record)
        await self._tags.set((repo.registry, repo.path, tag.name), record, ttl=MEMORY_TTL)

    async def _resolve_tag(
        self, repo: Repo, tag: Tag, accepted: frozenset[str], want_body: bool
    ) -> tuple[TagRecord, ManifestAnswer | None, bool]:
        """Tag -> digest: from the store within the TTL, else revalidated upstream, else stale if allowed."""
        policy = self._policy(repo)
        record = await self._tag_record(repo, tag)
        usable = record is not None and accepts(accepted, record.media_type)
        now = self._clock()
        if record is not None and usable and now - record.checked_at < policy.tag_ttl:
            self._count(repo, "tag", "hit")
            return record, None, False
        saving = self._client(repo).quota.saving() if record is not None and usable else None
        if record is not None and saving:
            # The upstream's pull quota is nearly spent (or it said 429): keep what is left for content the cache
            # does not have, and trust the known digest until the window passes.
            self._count(repo, "tag", "hit")
            self._metrics.ratelimit_deferred.labels(repo.registry, saving).inc()
            return record, None, False
        try:
            (fresh, answer), _ = await self._coalesce_tag.run(
                (repo.registry, repo.path, tag.name, accepted, want_body and record is None),
                lambda: self._revalidate(repo, tag, accepted, record if usable else None, want_body),
            )
        except errors.RegistryError as exc:
            cause = exc.__cause__ or exc.__context__
            stale_ok = (
                record is not None and usable and (policy.max_stale <= 0 or now - record.checked_at < policy.max_stale)
            )
            if stale_ok and record is not None and isinstance(exc, errors.UpstreamUnavailable | errors.TooManyRequests):
                reason = "rate_limited" if isinstance(exc, errors.TooManyRequests) else "unavailable"
                self._count(repo, "tag", "stale")
                self._metrics.stale_served.labels(repo.registry, reason).inc()
                log.warning("serving stale %s:%s -> %s (%s)", repo, tag, record.digest, cause or exc.message)
                return record, None, True
            raise
        return fresh, answer, False

    async def _revalidate(
        self, repo: Repo, tag: Tag, accepted: frozenset[str], known: TagRecord | None, want_body: bool
    ) -> tuple[TagRecord, ManifestAnswer | None]:
        """Ask the upstream what the tag points to now: HEAD when we hold a candidate, GET when a body is needed
        anyway (a cold GET by tag costs one request instead of two)."""
        client = self._client(repo)
        answer: ManifestAnswer | None = None
        if want_body and known is None:
            answer = await self._fetch_manifest(repo, tag.name, accepted)
            head = ManifestHead(answer.digest, answer.media_type, len(answer.data))
            self._count(repo, "tag", "miss")
        else:
            try:
                async with asyncio.timeout(self._policy(repo).timeout):
                    head = await client.head_manifest(repo.path, tag.name, upstream_accept(accepted))
            except UpstreamError as exc:
                if exc.status == 404:
                    await self._tag_not_found(repo, tag, accepted)
                raise upstream_failure(exc) from None
            except UpstreamInvalid:  # no digest in the HEAD answer: fall back to a GET
                answer = await self._fetch_manifest(repo, tag.name, accepted)
                head = ManifestHead(answer.digest, answer.media_type, len(answer.data))
            except (UpstreamUnreachable, TimeoutError) as exc:
                raise upstream_failure(exc) from None
            unchanged = known is not None and known.digest == head.digest
            self._count(repo, "tag", "revalidated" if unchanged else "miss")
        record = TagRecord(head.digest, head.media_type, head.size, self._clock())
        await self._save_tag(repo, tag, record)
        return record, answer

    async def _tag_not_found(self, repo: Repo, tag: Tag, accepted: frozenset[str]) -> NoReturn:
        """The upstream answered 404 for ``tag``. That means the tag is gone only when it was asked with every
        manifest type: Distribution also answers 404 when the tag's manifest is of a type the Accept does not name
        (an OCI index for a Docker-only client), and a client's narrow Accept must never erase the record that
        other clients, stale-if-error and the push rule rely on."""
        if names_every_type(accepted):
            await self._index.delete_tag(repo, tag.name)
            await self._tags.delete((repo.registry, repo.path, tag.name))
            message = f"manifest {tag} is not in {repo}"
        else:
            message = f"the upstream has no manifest of the accepted media types for {repo}:{tag}"
        raise errors.ManifestUnknown(message, detail={"name": repo.path, "reference": tag.name})

    async def list_tags(self, repo: Repo, n: int | None, last: str | None) -> tuple[list[str], str | None]:
        """One page of tag names and the upstream's Link header; cached tags when the upstream cannot answer."""
        params = {k: v for k, v in (("n", str(n) if n is not None else None), ("last", last)) if v is not None}
        try:
            async with asyncio.timeout(self._policy(repo).timeout):
                body, link = await self._client(repo).list_tags(repo.path, params)
            tags = body.get("tags") or []
            return [t for t in tags if isinstance(t, str)], link
        except UpstreamError as exc:
            if exc.status == 404:
                raise errors.NameUnknown(f"repository {repo} is not known upstream") from None
            if not _retryable(exc):
                raise upstream_failure(exc) from None
            failure: BaseException = exc
        except (UpstreamUnreachable, TimeoutError) as exc:
            failure = exc
        cached = list(await self._index.list_tags(repo))
        if not cached:
            raise upstream_failure(failure)
        self._metrics.stale_served.labels(repo.registry, "tags_list").inc()
        page = [t for t in cached if last is None or t > last]
        return (page[:n] if n is not None else page), None

    async def referrers(self, repo: Repo, subject: Digest, artifact_type: str | None) -> tuple[dict[str, Any], bool]:
        """The upstream's referrers of ``subject`` (OCI 1.1), passed through, not cached: referrers change without
        their subject changing. An upstream without the API gets a 404, so clients fall back to the tag schema."""
        params = {"artifactType": artifact_type} if artifact_type else {}
        try:
            async with asyncio.timeout(self._policy(repo).timeout):
                body, filtered = await self._client(repo).referrers(repo.path, subject, params)
        except UpstreamError as exc:
            if exc.status == 404:
                raise errors.NotFound(f"{repo.registry} offers no referrers for {repo.path}@{subject}") from None
            raise upstream_failure(exc) from None
        except (UpstreamUnreachable, UpstreamInvalid, TimeoutError) as exc:
            raise upstream_failure(exc) from None
        if not isinstance(body, dict) or not isinstance(body.get("manifests"), list):
            raise errors.UpstreamBadGateway("the upstream's referrers answer is not an image index")
        body["manifests"] = [m for m in body["manifests"] if isinstance(m, dict)]
        return body, filtered


async def _pump(
    content: aiohttp.StreamReader,
    writer: BlobWriterLike,
    fetch: Fetch,
    fetched: Any,
    floor: Throughput,
    bound: tuple[int, Exception],
) -> None:
    """Upstream body -> temp file, reading the next batches while earlier ones are written and hashed in a
    thread (at most WRITE_AHEAD batches in memory), so the network and the disk work at the same time. If
    reading fails, the write under way is let finish (a thread cannot be stopped) before the error goes up, so
    the caller's abort never races a write. The body may not grow past ``bound`` (its error is raised then) nor
    arrive slower than ``floor`` allows (TooSlow)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(WRITE_AHEAD)
    stop = False
    limit, too_big = bound
    received = 0

    async def write_all() -> None:
        while (chunk := await queue.get()) and not stop:
            await writer.write(chunk)
            fetch.advance(writer.written)
            fetched.inc(len(chunk))

    writing = asyncio.create_task(write_all())
    try:
        async with floor:
            async for chunk in _batched(content):
                received += len(chunk)
                if received > limit:
                    raise too_big
                floor.advance(len(chunk))
                if not await _put(queue, chunk, writing):
                    break  # the write failed: its error is raised below
        await _put(queue, b"", writing)
        await writing
    finally:
        if not writing.done():
            stop = True
            if not queue.full():
                queue.put_nowait(b"")
            await asyncio.wait((writing,))
        if not writing.cancelled() and writing.exception() is not None:
            log.debug("write stopped: %s", writing.exception())


async def _put(queue: asyncio.Queue[bytes], chunk: bytes, writing: asyncio.Task[None]) -> bool:
    """Queue ``chunk`` for the writer; False if the writer ended (it failed) instead."""
    if writing.done():
        return False
    if not queue.full():
        queue.put_nowait(chunk)
        return True
    put = asyncio.ensure_future(queue.put(chunk))
    await asyncio.wait((put, writing), return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        return False
    return True


async def _batched(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Yield the body in pieces of up to WRITE_BATCH bytes without waiting for a full batch: whatever is buffered
    goes out as soon as nothing more is immediately available, so slow upstreams still stream promptly."""
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        parts = [chunk]
        size = len(chunk)
        while size < WRITE_BATCH:
            more = content.read_nowait(WRITE_BATCH - size)
            if not more:
                break
            parts.append(more)
            size += len(more)
        yield chunk if len(parts) == 1 else b"".join(parts)
