"""The pull-through service: manifests, tags and blobs from the store, or from the upstream on a miss.

Contract with the HTTP layer: it asks for a blob, a manifest or a tag list of a ``Repo`` and gets either stored
content or a fetch to stream (``mirror.content``); it never learns whether an upstream was asked (the ``stale``
flag aside). Blobs are ``pull.blobs``'s (the miss path); upstream failures become OCI errors in ``pull.failures``.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from aiocache import SimpleMemoryCache
from cachetools import LRUCache

from mirror.content import BlobAnswer, BlobHeadAnswer, Content, ManifestAnswer
from mirror.metrics import Metrics
from mirror.oci import errors
from mirror.oci.mediatypes import DEFAULT_ACCEPT, MANIFEST_TYPES, accepts, names_every_type, upstream_accept
from mirror.oci.reference import Digest, Repo, Tag
from mirror.pull.blobs import BlobPuller, Names, blob_unknown
from mirror.pull.failures import UPSTREAM_FAILURES, failure, retryable, upstream_errors
from mirror.pull.inflight import Coalescer, FetchCoordinator, InFlight, ProcessOnly, RefLocking
from mirror.storage.base import BlobStorage, MetadataIndex, NullUsage, UsageRecorder
from mirror.storage.index import ManifestRecord, TagRecord
from mirror.storage.reflocks import RefLocks
from mirror.upstream.client import ManifestHead, UpstreamClient
from mirror.upstream.errors import UpstreamError, UpstreamInvalid, UpstreamUnreachable

log = logging.getLogger(__name__)
MEMORY_TTL = 30.0  # seconds a tag record stays in memory before the index is read again
# Hot manifests kept in memory, bounded in bytes (least recently used out first).
MANIFEST_MEMORY_BYTES = 32 << 20
VOUCHED_MEMORY = 1 << 16  # (registry, digest) pairs known to be servable under that registry's names
EVERY_MANIFEST_TYPE = ", ".join((*DEFAULT_ACCEPT, *sorted(MANIFEST_TYPES - set(DEFAULT_ACCEPT))))
PULLED_MEMORY = 4096  # repositories remembered as marked pulled-through (a miss costs one idempotent index write)


@dataclass(frozen=True, slots=True)
class TagPolicy:
    tag_ttl: float = 300.0
    max_stale: float = 0.0  # 0: serve stale tags however old
    timeout: float = 10.0  # longest a client waits on the upstream before a stale answer


def _manifest_unknown(repo: Repo, ref: str) -> errors.RegistryError:
    return errors.ManifestUnknown(f"manifest {ref} is not in {repo}", detail={"name": repo.path, "reference": ref})


def _unknown(repo: Repo, digest: Digest, kind: str) -> errors.RegistryError:
    return blob_unknown(repo, digest) if kind == "blob" else _manifest_unknown(repo, str(digest))


class PullThrough:
    """The pull-through ``Content``: blobs through ``BlobPuller`` (the miss path), manifests and tags here; the
    rules per name (which upstream, its timeout, ``vouch``) are offered to the miss path as ``pull.blobs.Names``."""

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
        inflight: FetchCoordinator | None = None,  # the coordination of blob fetches (default: in-process)
        ref_locks: RefLocking | None = None,  # of manifest and tag requests across processes (default: none)
    ):
        self._store = store
        self._usage: UsageRecorder = usage or NullUsage()
        self._index = index
        self._upstreams = upstreams
        self._policies = policies
        self._metrics = metrics
        self._clock = clock
        # ``is None``, not ``or``: an idle InFlight is falsy (it has a length).
        self.inflight: FetchCoordinator = InFlight() if inflight is None else inflight
        self._blobs = BlobPuller(self, store, index, self._usage, metrics, self.inflight, cache_size)
        self._tags: SimpleMemoryCache = SimpleMemoryCache(timeout=None)
        self._manifests: LRUCache[Digest, tuple[str, bytes]] = LRUCache(
            MANIFEST_MEMORY_BYTES, getsizeof=lambda item: len(item[1])
        )
        self._pulled: LRUCache[Repo, bool] = LRUCache(PULLED_MEMORY)  # repositories known to be marked pulled
        self._vouched: LRUCache[tuple[str, Digest], bool] = LRUCache(VOUCHED_MEMORY)  # see vouch
        self._coalesce_tag: Coalescer[tuple[TagRecord, ManifestAnswer | None]] = Coalescer()
        self._coalesce_manifest: Coalescer[ManifestAnswer] = Coalescer()
        self._ref_locks: RefLocking = ref_locks or ProcessOnly()

    async def close(self) -> None:
        await self.inflight.close()

    # --- the rules per name (pull.blobs.Names) ----------------------------------------------------------------
    def client(self, repo: Repo) -> UpstreamClient:
        client = self._upstreams.get(repo.registry)
        if client is None:
            raise errors.NameUnknown(f"registry {repo.registry!r} is not configured as an upstream")
        return client

    def timeout(self, repo: Repo) -> float:
        return self._policy(repo).timeout

    async def mark_pulled(self, repo: Repo) -> None:
        """Record that content was fetched upstream under ``repo``: from then on a push may not shadow the name
        (``push.registry.LocalRegistry.target``), whether the pull was by tag or by digest only."""
        if repo not in self._pulled:
            await self._index.mark_pulled(repo)
            self._pulled[repo] = True

    async def vouch(self, repo: Repo, digest: Digest, kind: str) -> None:
        """Stored content is answered under a pull-through name only if that name's upstream sent it (or holds
        it): pushed content stays private to its local repositories, and content of one upstream is never served
        through another upstream's names by digest. Known pairs are remembered in memory (origins only grow);
        otherwise the index decides (``Index.may_serve``), and when it cannot, the upstream is asked with a HEAD
        (HEADs do not count against Docker Hub's pull limit). Raises BLOB_UNKNOWN / MANIFEST_UNKNOWN when the
        upstream does not hold it."""
        key = (repo.registry, digest)
        if key in self._vouched:  # the hot path: a dict lookup (recency is not refreshed; a miss costs one read)
            return
        if await self._index.may_serve(digest, repo.registry):
            self._vouched[key] = True
            return
        client = self.client(repo)
        with upstream_errors(not_found=lambda: _unknown(repo, digest, kind)):
            async with asyncio.timeout(self.timeout(repo)):
                if kind == "blob":
                    await client.head_blob(repo.path, digest)
                else:
                    await client.head_manifest(repo.path, str(digest), EVERY_MANIFEST_TYPE)
        await self.add_origin(repo, digest)

    async def add_origin(self, repo: Repo, digest: Digest) -> None:
        """``repo``'s upstream sent (or holds) ``digest``: recorded in the index, and remembered here, so that
        this process serves it under that upstream's names without asking the index again (nor Redis, which a
        replica's hits then do without)."""
        await self._index.add_origin(digest, repo.registry)
        self._vouched[(repo.registry, digest)] = True

    def count(self, repo: Repo, kind: str, result: str) -> None:
        self._metrics.cache_requests.labels(repo.registry, kind, result).inc()
        self._metrics.repos.count(str(repo), kind, result)

    # --- blobs: pull.blobs ------------------------------------------------------------------------------------
    async def blob(self, repo: Repo, digest: Digest) -> BlobAnswer:
        """A stored blob (hit), or the fetch a client streams from (miss; joined if one is under way)."""
        return await self._blobs.blob(repo, digest)

    async def blob_head(self, repo: Repo, digest: Digest) -> BlobHeadAnswer:
        """What a HEAD needs: the stored blob, the fetch under way, or the size the upstream announces."""
        return await self._blobs.blob_head(repo, digest)

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
            await self.vouch(repo, digest, "manifest")
            self.count(repo, "manifest", "hit")
            self._usage.touch(digest)
            return ManifestAnswer(digest, stored[0], stored[1])
        self.count(repo, "manifest", "miss")
        answer, _ = await self._coalesce_manifest.run(
            (repo.registry, digest), lambda: self._fetch_manifest_once(repo, digest)
        )
        await self.mark_pulled(repo)  # a joined caller may have asked under another name
        return answer

    async def _fetch_manifest_once(self, repo: Repo, digest: Digest) -> ManifestAnswer:
        """``_fetch_manifest`` by digest once for the host: under its lock, unless another process stored it."""
        began = time.monotonic()
        async with self._ref_locks.hold(f"manifest {repo.registry} {digest}", self.timeout(repo)) as held:
            stored = await self._stored_manifest(digest)
            if stored is not None:
                await self.vouch(repo, digest, "manifest")
                return ManifestAnswer(digest, *stored)
            return await self._fetch_manifest(repo, str(digest), frozenset(), self._left(repo, began, held))

    def _left(self, repo: Repo, began: float, held: bool) -> float:
        """What is left of a client's wait on the upstream begun at ``began``, after waiting for another process's
        request; none if that took the whole wait (UpstreamUnavailable: a stale answer if there is one)."""
        if not held:
            raise errors.UpstreamUnavailable("another process has been asking the upstream for it the whole time")
        return max(0.001, self.timeout(repo) - (time.monotonic() - began))

    async def _fetch_manifest(
        self, repo: Repo, ref: str, accepted: frozenset[str], within: float | None = None
    ) -> ManifestAnswer:
        """GET a manifest upstream (within ``within`` s, else the timeout), verify and store it. Raises registry errors."""
        client = self.client(repo)
        # By digest the content is fixed whatever we accept, so accept every type we know.
        accept = upstream_accept(accepted) if ":" not in ref else EVERY_MANIFEST_TYPE
        with upstream_errors(not_found=lambda: _manifest_unknown(repo, ref)):
            async with asyncio.timeout(self.timeout(repo) if within is None else within):
                head, data = await client.get_manifest(repo.path, ref, accept)
        with upstream_errors():  # DiskFull: 507
            await self._store.put(data, head.digest)
        await self._index.put_manifest(head.digest, ManifestRecord(head.media_type, len(data)))
        await self.add_origin(repo, head.digest)
        await self._usage.added(head.digest, len(data), "manifest", str(repo))
        await self.mark_pulled(repo)
        self._remember(head.digest, head.media_type, data)
        return ManifestAnswer(head.digest, head.media_type, data)

    def _policy(self, repo: Repo) -> TagPolicy:
        return self._policies.get(repo.registry) or TagPolicy()

    # --- tags ------------------------------------------------------------------------------------------------
    async def _tag_record(self, repo: Repo, tag: Tag) -> TagRecord | None:
        """From memory within the tag's TTL, else the index (another process may have revalidated it since)."""
        key = (repo.registry, repo.path, tag.name)
        record = await self._tags.get(key)
        if isinstance(record, TagRecord) and self._clock() - record.checked_at < self._policy(repo).tag_ttl:
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
            self.count(repo, "tag", "hit")
            return record, None, False
        saving = await self.client(repo).quota.check() if record is not None and usable else None
        if record is not None and saving:
            # The upstream's pull quota is nearly spent (or it said 429): keep what is left for content the cache
            # does not have, and trust the known digest until the window passes.
            self.count(repo, "tag", "hit")
            self._metrics.ratelimit_deferred.labels(repo.registry, saving).inc()
            return record, None, False
        try:
            (fresh, answer), _ = await self._coalesce_tag.run(
                (repo.registry, repo.path, tag.name, accepted, want_body and record is None),
                lambda: self._revalidate_once(repo, tag, accepted, record if usable else None, want_body),
            )
        except errors.RegistryError as exc:
            cause = exc.__cause__ or exc.__context__
            stale_ok = (
                record is not None and usable and (policy.max_stale <= 0 or now - record.checked_at < policy.max_stale)
            )
            if stale_ok and record is not None and isinstance(exc, errors.UpstreamUnavailable | errors.TooManyRequests):
                reason = "rate_limited" if isinstance(exc, errors.TooManyRequests) else "unavailable"
                self.count(repo, "tag", "stale")
                self._metrics.stale_served.labels(repo.registry, reason).inc()
                log.warning("serving stale %s:%s -> %s (%s)", repo, tag, record.digest, cause or exc.message)
                return record, None, True
            raise
        return fresh, answer, False

    async def _revalidate_once(
        self, repo: Repo, tag: Tag, accepted: frozenset[str], known: TagRecord | None, want_body: bool
    ) -> tuple[TagRecord, ManifestAnswer | None]:
        """``_revalidate`` once for the host: under the tag's lock, unless another process just revalidated it."""
        began = time.monotonic()
        async with self._ref_locks.hold(f"tag {repo.registry} {repo.path} {tag.name}", self.timeout(repo)) as held:
            record = await self._index.get_tag(repo, tag.name)
            fresh = record is not None and self._clock() - record.checked_at < self._policy(repo).tag_ttl
            if record is not None and fresh and accepts(accepted, record.media_type):
                await self._tags.set((repo.registry, repo.path, tag.name), record, ttl=MEMORY_TTL)
                self.count(repo, "tag", "hit")
                return record, None
            return await self._revalidate(repo, tag, accepted, known, want_body, self._left(repo, began, held))

    async def _revalidate(
        self, repo: Repo, tag: Tag, accepted: frozenset[str], known: TagRecord | None, want_body: bool, within: float
    ) -> tuple[TagRecord, ManifestAnswer | None]:
        """Ask the upstream what the tag points to now, within ``within`` seconds: HEAD when we hold a candidate,
        GET when a body is needed anyway (a cold GET by tag costs one request instead of two)."""
        client = self.client(repo)
        answer: ManifestAnswer | None = None
        if want_body and known is None:
            answer = await self._fetch_manifest(repo, tag.name, accepted, within)
            head = ManifestHead(answer.digest, answer.media_type, len(answer.data))
            self.count(repo, "tag", "miss")
        else:
            try:
                async with asyncio.timeout(within):
                    head = await client.head_manifest(repo.path, tag.name, upstream_accept(accepted))
            except UpstreamInvalid:  # no digest in the HEAD answer: fall back to a GET
                answer = await self._fetch_manifest(repo, tag.name, accepted, within)
                head = ManifestHead(answer.digest, answer.media_type, len(answer.data))
            except UPSTREAM_FAILURES as exc:  # the one 404 with a side effect: see _tag_not_found
                if isinstance(exc, UpstreamError) and exc.status == 404:
                    await self._tag_not_found(repo, tag, accepted)
                raise failure(exc) from None
            unchanged = known is not None and known.digest == head.digest
            self.count(repo, "tag", "revalidated" if unchanged else "miss")
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
            async with asyncio.timeout(self.timeout(repo)):
                body, link = await self.client(repo).list_tags(repo.path, params)
            tags = body.get("tags") or []
            return [t for t in tags if isinstance(t, str)], link
        except UpstreamError as exc:
            if exc.status == 404 or not retryable(exc):
                not_found = errors.NameUnknown(f"repository {repo} is not known upstream")
                raise failure(exc, lambda: not_found) from None
            cause: BaseException = exc
        except (UpstreamUnreachable, TimeoutError) as exc:
            cause = exc
        cached = list(await self._index.list_tags(repo))
        if not cached:
            raise failure(cause)
        self._metrics.stale_served.labels(repo.registry, "tags_list").inc()
        page = [t for t in cached if last is None or t > last]
        return (page[:n] if n is not None else page), None

    async def referrers(self, repo: Repo, subject: Digest, artifact_type: str | None) -> tuple[dict[str, Any], bool]:
        """The upstream's referrers of ``subject`` (OCI 1.1), passed through, not cached: referrers change without
        their subject changing. An upstream without the API gets a 404, so clients fall back to the tag schema."""
        params = {"artifactType": artifact_type} if artifact_type else {}
        with upstream_errors(
            not_found=lambda: errors.NotFound(f"{repo.registry} offers no referrers for {repo.path}@{subject}")
        ):
            async with asyncio.timeout(self.timeout(repo)):
                body, filtered = await self.client(repo).referrers(repo.path, subject, params)
        if not isinstance(body, dict) or not isinstance(body.get("manifests"), list):
            raise errors.UpstreamBadGateway("the upstream's referrers answer is not an image index")
        body["manifests"] = [m for m in body["manifests"] if isinstance(m, dict)]
        return body, filtered


if TYPE_CHECKING:  # the service offers the read interface and the rules the miss path needs (checked by mypy)

    def _checks(service: PullThrough) -> tuple[Content, Names]:
        return service, service

    _ref_locks: RefLocking = RefLocks(Path())
