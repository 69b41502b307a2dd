"""Operating the cache: the logic behind ``mirror stats|ls|pin|unpin|evict|gc|verify|prefetch`` and the JSON admin
API (``api/admin.py``). Both call the same ``Admin`` methods, which return plain JSON-ready dicts.

An ``Admin`` works either inside ``mirror serve`` (``live=True``: the housekeeper's in-memory table is current
and its eviction is used) or in a CLI process next to a running server on the same data dir (``live=False``:
the table is loaded from disk, and anything removed bumps the usage generation so the server reloads).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mirror.content import MemoryBlob, StoredBlob
from mirror.oci.errors import Busy
from mirror.oci.manifest import parse_manifest
from mirror.oci.mediatypes import INDEX_TYPES
from mirror.oci.reference import DOCKER_HUB, Digest, Repo, Tag, format_image_ref
from mirror.pull.failures import failure
from mirror.pull.service import PullThrough
from mirror.routing import image as parse_image
from mirror.storage import gc
from mirror.storage.base import BlobStorage, MetadataIndex
from mirror.storage.evictlock import EvictionBusy, EvictionTurn
from mirror.storage.housekeeper import Housekeeper
from mirror.storage.usage import Usage

Progress = Callable[[int, int, str], None]  # (done, total, what)


def _no_progress(done: int, total: int, what: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class GcSettings:
    grace: float = 3600.0
    tmp_max_age: float = 3600.0


class Admin:
    def __init__(
        self,
        store: BlobStorage,
        index: MetadataIndex,
        usage: Usage,
        housekeeper: Housekeeper,
        pull: PullThrough | None,
        default_registry: str = DOCKER_HUB,
        gc_settings: GcSettings | None = None,
        live: bool = True,
        turn: EvictionTurn | None = None,
    ):
        self.store = store
        self.index = index
        self.usage = usage
        self.housekeeper = housekeeper
        self.pull = pull
        self.default_registry = default_registry
        self.gc_settings = gc_settings or GcSettings()
        self.live = live
        # The lock of the processes evicting on the data dir (or of the replicas), held around every removal (waited
        # for up to turn_timeout s): by a CLI command, and by a server that shares the data dir for its gc and verify.
        self.turn = turn
        self.turn_timeout = 120.0

    async def refresh(self) -> None:
        """Bring counters and the table up to date: a flush when serving, a load from disk otherwise."""
        if self.live:
            await self.housekeeper.flush()
        else:
            self.usage.install(*await asyncio.to_thread(self.usage.load_sync))

    @contextlib.asynccontextmanager
    async def _removing(self, removes: bool = True) -> AsyncIterator[None]:
        """Around a removal of content: no other process on the data dir (or replica) evicts meanwhile (the servers'
        evictors take the same lock), and the table is read once the lock is held."""
        turn = self.turn if removes else None
        if turn is not None:
            try:
                await asyncio.to_thread(turn.acquire_sync, self.turn_timeout)
            except EvictionBusy as exc:
                if self.live:  # the admin API: a registry error, as for any request
                    raise Busy(str(exc)) from exc
                raise
        try:
            await self.refresh()
            yield
        finally:
            if turn is not None:
                turn.release_sync()  # closes one descriptor: instant

    async def _changed(self) -> None:
        if not self.live:
            await asyncio.to_thread(self.usage.bump_generation_sync)

    # --- stats and ls ---------------------------------------------------------------------------------------
    async def stats(self, top: int = 10, fresh: bool = True) -> dict[str, Any]:
        """``fresh=False`` (the web page's overview, loaded often): the protected bytes as the housekeeper last
        computed them (at most a minute ago; pins from here mark them stale) and the per-repository counters as
        this process keeps them, instead of walking the index and the usage table."""
        await self.refresh()
        protected_bytes = self.housekeeper.recent_protected_bytes() if not fresh and self.live else None
        if protected_bytes is None:
            protected = await self.housekeeper.protected()
            protected_bytes = sum(e.size for k, e in self.usage.table.items() if k in protected)
        read = self.usage.repo_counts_sync if fresh or not self.live else self.usage.repo_counts_kept_sync
        repos = await asyncio.to_thread(read)
        pins = await asyncio.to_thread(self.usage.pins_sync)
        totals: dict[str, int] = {}
        for counts in repos.values():
            for name, value in counts.items():
                totals[name] = totals.get(name, 0) + value
        table = self.usage.table
        limits = self.housekeeper.limits
        served = [e.last_served for e in table.values()]

        def ratio(kind: str) -> float | None:
            hits, misses = totals.get(f"{kind}_hit", 0), totals.get(f"{kind}_miss", 0)
            return round(hits / (hits + misses), 4) if hits + misses else None

        ranked = sorted(
            repos.items(), key=lambda item: -sum(v for k, v in item[1].items() if not k.startswith("bytes_"))
        )
        return {
            "size_bytes": self.usage.total + self.usage.upload_bytes,  # upload sessions count against the limit
            "upload_bytes": self.usage.upload_bytes,
            "upload_sessions": self.usage.upload_sessions,
            "limit_bytes": limits.size,
            "high_watermark_bytes": limits.high,
            "low_watermark_bytes": limits.low,
            "entries": self.usage.counts(),
            "protected_bytes": protected_bytes,
            "local_bytes": sum(e.size for e in table.values() if e.local),
            "pins": sorted(set(pins) | set(limits.pins)),
            "hit_ratio": {"blob": ratio("blob"), "manifest": ratio("manifest"), "tag": ratio("tag")},
            "bytes_served": {"cache": totals.get("bytes_cache", 0), "upstream": totals.get("bytes_upstream", 0)},
            "oldest_served": min(served) if served else None,
            "newest_served": max(served) if served else None,
            "top_repositories": [{"repo": repo, **counts} for repo, counts in ranked[:top]],
        }

    async def ls(self) -> list[dict[str, Any]]:
        """What is cached: per repository its tags, their platforms, size on disk and last served time."""
        await self.refresh()
        return await asyncio.to_thread(self._ls_sync, dict(self.usage.table))

    def _ls_sync(self, table: dict[str, Any]) -> list[dict[str, Any]]:
        repos: dict[str, dict[str, Any]] = {}
        tagged: set[str] = set()
        for registry, path, tag, record in self.index.iter_tags_sync():
            image = self._describe(record.digest, table)
            image["tag"] = tag
            tagged.add(str(record.digest))
            repos.setdefault(f"{registry}/{path}", {"tags": [], "untagged": []})["tags"].append(image)
        for key, entry in table.items():
            if entry.kind == "manifest" and key not in tagged and entry.repo:
                found_manifest = self.index.get_manifest_sync(Digest.parse(key))
                if found_manifest is not None and found_manifest.media_type in INDEX_TYPES:
                    repos.setdefault(entry.repo, {"tags": [], "untagged": []})["untagged"].append(
                        self._describe(Digest.parse(key), table)
                    )
        out = []
        for name, found in sorted(repos.items()):
            images = found["tags"] + found["untagged"]
            out.append(
                {
                    "repo": name,
                    "tags": sorted(found["tags"], key=lambda i: i["tag"]),
                    "untagged": found["untagged"],
                    "size_bytes": sum(i["size_bytes"] for i in images),
                    "last_served": max((i["last_served"] or 0 for i in images), default=0) or None,
                }
            )
        return out

    def _describe(self, digest: Digest, table: dict[str, Any]) -> dict[str, Any]:
        """One image: its digest, cached platforms, bytes on disk (each blob once), last served."""
        closure = gc.closure(self.store, self.index, [digest])
        platforms = []
        record = self.index.get_manifest_sync(digest)
        if record is not None:
            data = self.store.read_sync(digest) or b""
            try:
                manifest = parse_manifest(data, record.media_type) if data else None
            except Exception:
                manifest = None
            for child in manifest.children if manifest else ():
                platforms.append({"platform": child.platform or "", "cached": str(child.digest) in table})
        entries = [table[k] for k in closure if k in table]
        return {
            "digest": str(digest),
            "cached": str(digest) in table,
            "platforms": platforms,
            "size_bytes": sum(e.size for e in entries),
            "blobs": len(entries),
            "last_served": max((e.last_served for e in entries), default=None),
        }

    # --- pins -----------------------------------------------------------------------------------------------
    async def pins(self) -> dict[str, Any]:
        pins = await asyncio.to_thread(self.usage.pins_sync)
        return {"pins": sorted(pins), "config_pins": sorted(self.housekeeper.limits.pins)}

    async def pin(self, image: str) -> dict[str, Any]:
        name = format_image_ref(*parse_image(image, self.default_registry))
        added = await asyncio.to_thread(self.usage.pin_sync, name)
        self.housekeeper.protected_changed()
        return {"image": name, "pinned": True, "changed": added}

    async def unpin(self, image: str) -> dict[str, Any]:
        name = format_image_ref(*parse_image(image, self.default_registry))
        removed = await asyncio.to_thread(self.usage.unpin_sync, name)
        self.housekeeper.protected_changed()
        return {"image": name, "pinned": False, "changed": removed}

    # --- evict, gc, verify ----------------------------------------------------------------------------------
    async def evict(self, dry_run: bool = True, target: int | None = None) -> dict[str, Any]:
        """What eviction to the low watermark (or ``target`` bytes) removes now: least recently served first."""
        limits = self.housekeeper.limits
        async with self._removing(not dry_run and not self.live):  # a server's evictions take the lock themselves
            if dry_run:
                removed = await self.housekeeper.plan(target)
                freed = sum(r.size for r in removed)
            else:
                report = await self.housekeeper.evict(target)
                removed, freed = report.removed, report.bytes
                if removed:
                    await self._changed()
        return {
            "dry_run": dry_run,
            "size_bytes": self.usage.total,
            "limit_bytes": limits.size,
            "target_bytes": limits.low if target is None else target,
            "removed": [r.__dict__ for r in removed],
            "removed_count": len(removed),
            "removed_bytes": freed,
        }

    async def gc(self, dry_run: bool = False) -> dict[str, Any]:
        async with self._removing(not dry_run):  # refreshed: last-served times on disk, for the grace period
            return await self._gc(dry_run)

    async def _gc(self, dry_run: bool) -> dict[str, Any]:
        busy = self.usage.busy if self.live else (lambda key: False)
        report = await asyncio.to_thread(
            gc.collect_sync,
            self.store,
            self.index,
            self.usage,
            self.housekeeper.limits.pins,
            self.gc_settings.grace,
            self.gc_settings.tmp_max_age,
            dry_run,
            busy,
        )
        if self.live and not dry_run:
            await self.housekeeper.reload()
        return report.as_dict()

    async def verify(self, progress: Progress = _no_progress) -> dict[str, Any]:
        async with self._removing():
            report = await asyncio.to_thread(gc.verify_sync, self.store, self.index, self.usage, progress)
        if self.live and report.removed:
            await self.housekeeper.reload()
        return report.as_dict()

    # --- prefetch -------------------------------------------------------------------------------------------
    async def prefetch(
        self, images: Iterable[str], platforms: Iterable[str] = (), progress: Progress = _no_progress
    ) -> list[dict[str, Any]]:
        """Pull images through into the cache (all platforms, or only ``platforms`` such as ``linux/amd64``)."""
        if self.pull is None:
            raise RuntimeError("prefetch needs the pull-through service")
        wanted = set(platforms)
        results = []
        for image in images:
            repo, ref = parse_image(image, self.default_registry)
            name = format_image_ref(repo, ref)
            started = time.monotonic()
            blobs = await self._image_blobs(repo, ref, wanted)
            total = sum(size for _, size in blobs)
            done = fetched = 0
            for digest, size in blobs:
                fetched += await self._fetch(repo, digest)
                done += size
                progress(done, total, f"{name} {digest}")
            results.append(
                {
                    "image": name,
                    "blobs": len(blobs),
                    "bytes": total,
                    "fetched_bytes": fetched,
                    "seconds": round(time.monotonic() - started, 3),
                }
            )
        if any(r["fetched_bytes"] for r in results):
            await self._changed()
        return results

    async def _image_blobs(self, repo: Repo, ref: Tag | Digest, platforms: set[str]) -> list[tuple[Digest, int]]:
        assert self.pull is not None
        answer = await self.pull.manifest(repo, ref, frozenset())
        manifest = parse_manifest(answer.data, answer.media_type)
        images = [manifest]
        if manifest.is_index:
            images = []
            for child in manifest.children:
                if platforms and child.platform not in platforms:
                    continue
                sub = await self.pull.manifest(repo, child.digest, frozenset())
                images.append(parse_manifest(sub.data, sub.media_type))
        blobs: dict[Digest, int] = {}
        for image in images:
            for desc in (*([image.config] if image.config else []), *image.layers):
                blobs[desc.digest] = max(desc.size, 0)
        return list(blobs.items())

    async def _fetch(self, repo: Repo, digest: Digest) -> int:
        """Make sure one blob is cached; the bytes fetched from the upstream for it (0 on a hit)."""
        assert self.pull is not None
        source = await self.pull.blob(repo, digest)
        if isinstance(source, StoredBlob | MemoryBlob):
            return 0
        await source.wait_beyond(1 << 62)
        if source.error is not None:
            raise failure(source.error) from source.error
        return source.written
