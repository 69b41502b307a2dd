"""The on-disk index (diskcache, SQLite underneath): what is known about stored content besides its bytes.

Keys (tuples, so each kind has its own namespace):

    ("manifest", "<digest>")                    -> ManifestRecord: media type and size of a stored manifest
    ("tag", "<registry>", "<repo>", "<tag>")    -> TagRecord: digest, media type, when last confirmed upstream
    ("tags", "<registry>", "<repo>")            -> sorted tuple of cached tag names (the tags/list fallback)
    ("pulled", "<registry>", "<repo>")          -> True: content was pulled through under this name (a tag, a
                                                   manifest or a blob fetched upstream), so a push may not
                                                   shadow it (``push.registry.LocalRegistry.target``)
    ("origin", "<digest>")                      -> frozenset of the registries a blob or manifest was fetched from
                                                   (or that confirmed holding it): under a pull-through name of
                                                   registry R, stored content is served only if R is among them
                                                   (``pull.service.PullThrough.vouch``), so pushed content and content of one
                                                   upstream never leak through another name by digest

Local (pushed) repositories use the same tag keys with the registry ``local``, plus:

    ("local-repos",)                            -> sorted tuple of the names of local repositories
    ("pushed", "<digest>")                      -> frozenset of local repositories a blob or manifest is linked
                                                   into: pushed content, never evicted while this is non-empty
    ("referrers", "<repo>", "<digest>")         -> tuple of descriptors (dicts) of the manifests in a local repo
                                                   whose ``subject`` is <digest> (OCI 1.1 referrers API)

The names of all repositories, for the web page's paged listing, are plain strings (diskcache stores those as
SQLite TEXT, in its unique index on the key, so a page is a range scan of that index, never a walk of the cache):

    "repo:<registry>/<path>"                    -> True, for a pulled-through repository (``mark_pulled``, a tag)
    "repo:local/<name>"                         -> True, for a local (pushed) repository
    "repo-list"                                 -> 1 once the names of a data dir from before them were added

Blob bytes live in ``BlobStore``; the index never holds them. diskcache is synchronous, so every method here
runs in a thread; callers on the hot path put a small memory cache in front.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache

from mirror.oci.reference import LOCAL, Digest, Repo
from mirror.storage.records import ManifestRecord as ManifestRecord  # importable from here, as before (and
from mirror.storage.records import TagRecord as TagRecord  # as pickled in existing data dirs)
from mirror.storage.records import descriptors_from, manifest_from, tag_from
from mirror.storage.sqlfull import disk_full

REPO_KEY = "repo:"  # then "<registry>/<path>"; ":" sorts after "/" and before letters, so the range is its own
REPO_KEYS_END = "repo;"  # the first string after every "repo:..." key
REPO_LIST_DONE = "repo-list"


def _like(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Index:
    def __init__(self, data_dir: Path):
        # A modest SQLite page cache; writes are small and rare compared to reads.
        self._cache = diskcache.Cache(str(data_dir / "index"), size_limit=2**40, eviction_policy="none")
        if len(self._cache) == 0:  # a new data dir: nothing was recorded before the repository listing
            self._cache.add(REPO_LIST_DONE, 1)

    def close(self) -> None:
        self._cache.close()

    # manifests -------------------------------------------------------------------------------------------
    def get_manifest_sync(self, digest: Digest) -> ManifestRecord | None:
        return manifest_from(self._cache.get(("manifest", str(digest))))

    async def get_manifest(self, digest: Digest) -> ManifestRecord | None:
        return await asyncio.to_thread(self.get_manifest_sync, digest)

    @disk_full
    def put_manifest_sync(self, digest: Digest, record: ManifestRecord) -> None:
        self._cache.set(("manifest", str(digest)), record)

    async def put_manifest(self, digest: Digest, record: ManifestRecord) -> None:
        await asyncio.to_thread(self.put_manifest_sync, digest, record)

    async def delete_manifest(self, digest: Digest) -> None:
        await asyncio.to_thread(self._cache.delete, ("manifest", str(digest)))

    # tags ------------------------------------------------------------------------------------------------
    async def get_tag(self, repo: Repo, tag: str) -> TagRecord | None:
        return tag_from(await asyncio.to_thread(self._cache.get, ("tag", repo.registry, repo.path, tag)))

    @disk_full
    def _put_tag_sync(self, repo: Repo, tag: str, record: TagRecord) -> None:
        with self._cache.transact():
            self._cache.set(("tag", repo.registry, repo.path, tag), record)
            key = ("tags", repo.registry, repo.path)
            tags = self._cache.get(key, default=())
            if tag not in tags:
                self._cache.set(key, tuple(sorted((*tags, tag))))
                self._cache.set(REPO_KEY + str(repo), True)

    async def put_tag(self, repo: Repo, tag: str, record: TagRecord) -> None:
        await asyncio.to_thread(self._put_tag_sync, repo, tag, record)

    @disk_full
    def _delete_tag_sync(self, repo: Repo, tag: str) -> None:
        with self._cache.transact():
            self._cache.delete(("tag", repo.registry, repo.path, tag))
            key = ("tags", repo.registry, repo.path)
            tags = self._cache.get(key, default=())
            if tag in tags:
                self._cache.set(key, tuple(t for t in tags if t != tag))

    async def delete_tag(self, repo: Repo, tag: str) -> None:
        await asyncio.to_thread(self._delete_tag_sync, repo, tag)

    def list_tags_sync(self, repo: Repo) -> tuple[str, ...]:
        value = self._cache.get(("tags", repo.registry, repo.path), ())
        return tuple(value) if isinstance(value, tuple) else ()

    async def list_tags(self, repo: Repo) -> tuple[str, ...]:
        return await asyncio.to_thread(self.list_tags_sync, repo)

    # repositories pulled through ------------------------------------------------------------------------
    @disk_full
    def _mark_pulled_sync(self, repo: Repo) -> None:
        with self._cache.transact():
            self._cache.set(("pulled", repo.registry, repo.path), True)
            self._cache.set(REPO_KEY + str(repo), True)

    async def mark_pulled(self, repo: Repo) -> None:
        await asyncio.to_thread(self._mark_pulled_sync, repo)

    async def pulled(self, repo: Repo) -> bool:
        """Whether content was ever pulled through under ``repo`` (tags aside: see ``list_tags``)."""
        return bool(await asyncio.to_thread(self._cache.get, ("pulled", repo.registry, repo.path), False))

    # where stored content came from ----------------------------------------------------------------------
    def may_serve_sync(self, digest: Digest, registry: str) -> bool:
        origins = self._cache.get(("origin", str(digest)), frozenset())
        if origins:
            return registry in origins
        # Nothing recorded: content cached before origins were recorded, or not stored at all (a miss, fetched
        # from ``registry`` next), unless it was pushed: pushed content is private to its local repositories.
        return not self.is_pushed_sync(digest)

    async def may_serve(self, digest: Digest, registry: str) -> bool:
        """Whether stored content ``digest`` may be answered under a pull-through name of ``registry``."""
        return await asyncio.to_thread(self.may_serve_sync, digest, registry)

    @disk_full
    def _add_origin_sync(self, digest: Digest, registry: str) -> None:
        with self._cache.transact():
            key = ("origin", str(digest))
            origins = self._cache.get(key, frozenset())
            if registry not in origins:
                self._cache.set(key, frozenset(origins) | {registry})

    async def add_origin(self, digest: Digest, registry: str) -> None:
        await asyncio.to_thread(self._add_origin_sync, digest, registry)

    # local (pushed) repositories -------------------------------------------------------------------------
    def local_repos_sync(self) -> tuple[str, ...]:
        value = self._cache.get(("local-repos",), ())
        return tuple(value) if isinstance(value, tuple) else ()

    @disk_full
    def _add_local_repo_sync(self, name: str) -> None:
        with self._cache.transact():
            repos = self.local_repos_sync()
            if name not in repos:
                self._cache.set(("local-repos",), tuple(sorted((*repos, name))))
                self._cache.set(REPO_KEY + str(Repo(LOCAL, name)), True)

    async def add_local_repo(self, name: str) -> None:
        await asyncio.to_thread(self._add_local_repo_sync, name)

    @disk_full
    def _link_sync(self, name: str, digest: Digest) -> None:
        with self._cache.transact():
            key = ("pushed", str(digest))
            repos = self._cache.get(key, frozenset())
            if name not in repos:
                self._cache.set(key, frozenset(repos) | {name})

    async def link(self, name: str, digest: Digest) -> None:
        """Record that a local repository holds a blob or manifest (an upload, a mount, a manifest PUT)."""
        await asyncio.to_thread(self._link_sync, name, digest)

    @disk_full
    def _unlink_sync(self, name: str, digest: Digest) -> bool:
        with self._cache.transact():
            key = ("pushed", str(digest))
            repos = self._cache.get(key, frozenset())
            if name not in repos:
                return False
            rest = frozenset(repos) - {name}
            if rest:
                self._cache.set(key, rest)
            else:
                self._cache.delete(key)
            return True

    async def unlink(self, name: str, digest: Digest) -> bool:
        """Remove a blob or manifest from a local repository; the bytes stay until garbage collection."""
        return await asyncio.to_thread(self._unlink_sync, name, digest)

    def pushed_in_sync(self, digest: Digest) -> frozenset[str]:
        value = self._cache.get(("pushed", str(digest)), frozenset())
        return value if isinstance(value, frozenset) else frozenset()

    def is_pushed_sync(self, digest: Digest) -> bool:
        """Whether any local repository holds this digest: such content is never evicted."""
        return bool(self.pushed_in_sync(digest))

    async def linked(self, name: str, digest: Digest) -> bool:
        return name in await asyncio.to_thread(self.pushed_in_sync, digest)

    @disk_full
    def _add_referrer_sync(self, name: str, subject: Digest, descriptor: dict[str, Any]) -> None:
        with self._cache.transact():
            key = ("referrers", name, str(subject))
            current = self._cache.get(key, ())
            kept = tuple(d for d in current if d.get("digest") != descriptor["digest"])
            self._cache.set(key, (*kept, descriptor))

    async def add_referrer(self, name: str, subject: Digest, descriptor: dict[str, Any]) -> None:
        await asyncio.to_thread(self._add_referrer_sync, name, subject, descriptor)

    @disk_full
    def _remove_referrer_sync(self, name: str, subject: Digest, digest: Digest) -> None:
        with self._cache.transact():
            key = ("referrers", name, str(subject))
            kept = tuple(d for d in self._cache.get(key, ()) if d.get("digest") != str(digest))
            if kept:
                self._cache.set(key, kept)
            else:
                self._cache.delete(key)

    async def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        await asyncio.to_thread(self._remove_referrer_sync, name, subject, digest)

    def referrers_sync(self, name: str, subject: Digest) -> tuple[dict[str, Any], ...]:
        return descriptors_from(self._cache.get(("referrers", name, str(subject)), ()))

    async def referrers(self, name: str, subject: Digest) -> tuple[dict[str, Any], ...]:
        return await asyncio.to_thread(self.referrers_sync, name, subject)

    # walks for housekeeping (gc, reconcile, pins, ``mirror ls``): threads only, never the hot path -------------
    def get_tag_sync(self, registry: str, path: str, tag: str) -> TagRecord | None:
        return tag_from(self._cache.get(("tag", registry, path, tag)))

    def iter_tags_sync(self) -> Iterator[tuple[str, str, str, TagRecord]]:
        """Every tag record as (registry, repo path, tag, record)."""
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and len(key) == 4 and key[0] == "tag":
                record = tag_from(self._cache.get(key))
                if record is not None:
                    yield key[1], key[2], key[3], record

    def iter_manifests_sync(self) -> Iterator[tuple[Digest, ManifestRecord]]:
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and len(key) == 2 and key[0] == "manifest":
                manifest = manifest_from(self._cache.get(key))
                if manifest is not None:
                    yield Digest.parse(key[1]), manifest

    def delete_manifest_sync(self, digest: Digest) -> None:
        self._cache.delete(("manifest", str(digest)))

    def delete_tag_sync(self, registry: str, path: str, tag: str) -> None:
        self._delete_tag_sync(Repo(registry, path), tag)

    def pushed_digests_sync(self) -> set[str]:
        """Digests a local (pushed) repository holds: ``("pushed", "<digest>")`` -> non-empty set of repository
        names, written by the push service when content is linked into a local repository. Never evicted."""
        found = set()
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and len(key) == 2 and key[0] == "pushed" and self._cache.get(key):
                found.add(str(key[1]))
        return found

    # the paged listing of repository names (the web page) ------------------------------------------------------
    def repositories_sync(self, search: str = "", after: str = "", limit: int = 50) -> list[Repo]:
        """Up to ``limit`` repositories (pulled through and local) whose "<registry>/<path>" contains ``search``
        (ASCII case-insensitive), in name order, after the name ``after``: one range scan of the key index."""
        self._list_existing_sync()
        # diskcache has no range query; its connection's ``execute`` is the one way in (read-only here).
        rows = self._cache._sql(
            "SELECT key FROM Cache WHERE raw = 1 AND key > ? AND key < ? AND key LIKE ? ESCAPE '\\'"
            " ORDER BY key LIMIT ?",
            (REPO_KEY + after, REPO_KEYS_END, REPO_KEY + "%" + _like(search) + "%", limit),
        ).fetchall()
        found = []
        for (key,) in rows:
            registry, _, path = str(key).removeprefix(REPO_KEY).partition("/")
            found.append(Repo(registry, path))
        return found

    def repository_known_sync(self, repo: Repo) -> bool:
        self._list_existing_sync()
        return bool(self._cache.get(REPO_KEY + str(repo)))

    @disk_full
    def _list_existing_sync(self) -> None:
        """Once per data dir: names recorded before the listing existed (pulled markers, tags, local repos)."""
        if self._cache.get(REPO_LIST_DONE):
            return
        names = {str(Repo(LOCAL, name)) for name in self.local_repos_sync()}
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and len(key) == 3 and key[0] in ("pulled", "tags"):
                names.add(f"{key[1]}/{key[2]}")
        with self._cache.transact():
            for name in names:
                self._cache.set(REPO_KEY + name, True)
            self._cache.set(REPO_LIST_DONE, 1)

    def healthy_sync(self) -> bool:
        """The index answers a read (for /readyz)."""
        self._cache.get(("readyz",))
        return True
