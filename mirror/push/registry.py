"""Local pushes: the mirror as a private registry (OCI distribution spec: push, content discovery, management).

Which names are local, and how they relate to pulled-through content (README, "Pushing images"):

- A *local repository* is a bare name (no ``?ns=``, no registry-host prefix) that has received pushed content.
  It is authoritative: every read of that name is answered from local content only, the upstream is never asked
  for it, and its content is never evicted. A name addressed with ``?ns=`` or a host prefix always means the
  upstream's repository and is never local: containerd and podman mirror clients never see pushed content.
- ``push.rules.PushRule`` decides which bare names accept a first push; besides, a name the mirror already serves
  pulled through from the default upstream (a cached tag, or any manifest or blob fetched upstream under the name,
  by digest too) is refused unless the operator named it: a push can never silently shadow an image clients
  already pull through this mirror. Who may push at all is the access policy's business (``mirror.access``).

Blobs live once in the shared store (disk or bucket); a local repository holds the blobs and manifests linked into
it in the index (``Index.link``). Everything linked is recorded in the usage table at once, as pushed (``local``):
the byte cap counts it, ``mirror stats`` shows it, eviction and gc never remove it. Deleting unlinks; content no
local repository holds any more loses its pushed mark (it becomes ordinary cached content, or garbage; a manifest
loses its record, so that it is no longer a root of gc), and its bytes go with garbage collection. At start-up
``gc.reconcile_sync`` re-marks whatever the index says is pushed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mirror.content import ManifestAnswer, StoredBlob
from mirror.oci import errors
from mirror.oci.manifest import Manifest, parse_manifest, sniff_media_type
from mirror.oci.mediatypes import DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, MANIFEST_TYPES, OCI_INDEX
from mirror.oci.reference import LOCAL, Digest, Repo, Tag, validate_name
from mirror.push.rules import PushRule
from mirror.push.uploads import Uploads
from mirror.storage.base import BlobStorage, RegistryIndex
from mirror.storage.counter import ChangeCounter
from mirror.storage.index import ManifestRecord, TagRecord
from mirror.storage.usage import Usage
from mirror.upstream.client import ManifestHead

log = logging.getLogger(__name__)
# Layers clients fetch from elsewhere (Windows base layers): a manifest may name them without them being pushed.
FOREIGN_LAYER_TYPES = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)
GENERIC_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})


@dataclass(frozen=True, slots=True)
class PushedManifest:
    digest: Digest
    media_type: str
    size: int
    tag: str | None
    subject: Digest | None


@dataclass(frozen=True, slots=True)
class DeletedManifest:
    digest: Digest
    media_type: str
    size: int
    tag: str | None  # set when a tag was deleted, not the manifest


class LocalRegistry:
    """Pushed content: local repositories, their manifests, tags, referrers and blobs, and the uploads.

    ``upstream_repo(name)`` is where a bare name would be pulled through from (routing without ``ns``).
    """

    def __init__(
        self,
        store: BlobStorage,
        index: RegistryIndex,
        uploads: Uploads,
        rule: PushRule,
        upstream_repo: Callable[[str], Repo],
        usage: Usage,
        clock: Callable[[], float] = time.time,
        changes: ChangeCounter | None = None,
    ):
        self._store = store
        self._index = index
        self._usage = usage
        self.uploads = uploads
        self._rule = rule
        self._upstream_repo = upstream_repo
        self._clock = clock
        self._repos: frozenset[str] = frozenset()
        # With other processes on the data dir (workers) or other replicas: bumped by whichever of them makes a
        # repository local, so the others read the names again before they route a request (``stale``/``refresh``).
        self._changes = changes
        self._seen = 0
        self._refreshing = asyncio.Lock()
        uploads.on_blob = self._blob_arrived

    def load(self) -> None:
        """Read the names of local repositories (blocking; called at start-up, in a thread). The counter is read
        before the names, and marked seen only once they are in: a request that finds it no longer stale (while this
        runs, requests go on in the event loop) routes with the new names, never the old ones."""
        seen = self._changes.value() if self._changes is not None else 0
        self._repos = self._repos | frozenset(self._index.local_repos_sync())  # names are only ever added
        self._seen = seen

    def stale(self) -> bool:
        """Whether another process or replica made a repository local since this one read the names (a memory
        read)."""
        return self._changes is not None and self._changes.value() != self._seen

    async def refresh(self) -> None:
        async with self._refreshing:
            if self.stale():
                await asyncio.to_thread(self.load)

    # --- names -----------------------------------------------------------------------------------------------
    def local(self, name: str, ns: str | None) -> Repo | None:
        """The local repository a read of ``name`` means, or None when it is pulled through."""
        if ns is None and name in self._repos:
            return Repo(LOCAL, name)
        return None

    def pushable(self, name: str, ns: str | None) -> bool:
        """Whether a write to ``name`` would be considered at all (without the check against cached content)."""
        return ns is None and (name in self._repos or self._rule.refusal(name) is None)

    def repositories(self) -> list[str]:
        return sorted(self._repos)

    async def target(self, name: str, ns: str | None) -> Repo:
        """The local repository a push to ``name`` goes to; DENIED when the push rule refuses it."""
        if ns is not None:
            raise errors.Denied(
                "pushes go to local repositories, which are named without ?ns=; names with ?ns= are pulled through"
            )
        validate_name(name)
        if name in self._repos:
            return Repo(LOCAL, name)
        reason = self._rule.refusal(name)
        if reason is None and not self._rule.explicit(name):
            upstream = self._upstream_repo(name)
            if await self._index.list_tags(upstream) or await self._index.pulled(upstream):
                reason = (
                    f"this mirror already serves {upstream} pulled through (tags, or manifests or blobs by "
                    "digest); a push would shadow it for every client (list the name in push_prefixes to allow that)"
                )
        if reason is not None:
            raise errors.Denied(f"pushes to {name!r} are refused: {reason}", detail={"name": name})
        return Repo(LOCAL, name)

    def existing(self, name: str, ns: str | None) -> Repo:
        """The local repository ``name`` for a delete; pulled-through content cannot be deleted (it is evicted)."""
        repo = self.local(name, ns)
        if repo is None:
            validate_name(name)
            raise errors.Unsupported(
                f"{name!r} is not a local repository: only pushed content can be deleted; cached content of "
                "upstream repositories is evicted, not deleted",
                detail={"name": name},
            )
        return repo

    async def _claim(self, repo: Repo) -> None:
        if repo.path in self._repos:
            return
        await self._index.add_local_repo(repo.path)
        if self._changes is not None:  # before the name is ours: a bump that fails is tried again by the next push
            await asyncio.to_thread(self._changes.bump_sync)
        self._repos = self._repos | {repo.path}
        log.info("%s is now a local repository: pulls of it are answered from pushed content only", repo.path)

    async def _blob_arrived(self, repo: Repo, digest: Digest, kind: str = "blob") -> None:
        """A blob (an upload, a mount) or a manifest was stored for ``repo``: link it, make the repository local."""
        await self._hold(repo, digest, kind)
        await self._claim(repo)

    async def _hold(self, repo: Repo, digest: Digest, kind: str, size: int | None = None) -> None:
        """Link ``digest`` into ``repo`` and record it in the usage table as pushed, from now on: counted against
        the byte cap, shown by ``mirror stats``, never evicted."""
        await self._index.link(repo.path, digest)
        entry = self._usage.table.get(str(digest))
        if entry is not None and entry.local:
            return  # recorded as pushed already (a layer a manifest PUT names after its upload)
        if size is None:
            size = await self._store.size(digest)
        if size is not None:
            await self._usage.added(digest, size, kind, str(repo), local=True)

    async def _released(self, digest: Digest) -> None:
        """``digest`` was unlinked from a local repository: once none holds it, it is no longer pushed (eviction
        and gc may remove it like any cached content)."""
        if not await asyncio.to_thread(self._index.is_pushed_sync, digest):
            await self._usage.mark_local([digest], local=False)

    # --- blobs -----------------------------------------------------------------------------------------------
    async def _linked_size(self, repo: Repo, digest: Digest) -> int | None:
        if not await self._index.linked(repo.path, digest):
            return None
        return await self._store.size(digest)

    async def blob(self, repo: Repo, digest: Digest) -> StoredBlob:
        size = await self._linked_size(repo, digest)
        if size is None:
            raise errors.BlobUnknown(f"blob {digest} is not in {repo.path}", detail={"digest": str(digest)})
        return StoredBlob(self._store.path(digest), size)

    async def blob_head(self, repo: Repo, digest: Digest) -> StoredBlob:
        return await self.blob(repo, digest)

    async def stored_blob(self, digest: Digest) -> StoredBlob:
        """A blob by digest alone, from the shared store (HEAD before the first push of a repository)."""
        size = await self._store.size(digest)
        if size is None:
            raise errors.BlobUnknown(f"blob {digest} is not stored here", detail={"digest": str(digest)})
        return StoredBlob(self._store.path(digest), size)

    async def mount(self, repo: Repo, digest: Digest, source: str | None, may_pull: Callable[[str], bool]) -> bool:
        """Cross-repository mount (``?mount=<digest>&from=<source>``): link a blob the store already holds, if the
        caller could read it from ``source`` anyway: ``source`` is a local repository holding it, or a pulled-through
        name whose upstream sent it, and the caller may pull ``source``. False otherwise (the client then uploads
        the blob, proving it has the bytes): a digest alone never grants access to pushed content."""
        if source is None or not may_pull(source) or await self._store.size(digest) is None:
            return False
        if self.local(source, None) is not None:
            readable = await self._index.linked(source, digest)
        else:
            try:
                readable = await self._index.may_serve(digest, self._upstream_repo(source).registry)
            except errors.RegistryError:  # not a name that routes anywhere
                readable = False
        if not readable:
            return False
        await self._blob_arrived(repo, digest)
        return True

    async def delete_blob(self, repo: Repo, digest: Digest) -> None:
        if not await self._index.unlink(repo.path, digest):
            raise errors.BlobUnknown(f"blob {digest} is not in {repo.path}", detail={"digest": str(digest)})
        await self._released(digest)
        log.info("deleted blob %s from %s (its bytes go with the next garbage collection)", digest, repo.path)

    # --- manifests -------------------------------------------------------------------------------------------
    async def put_manifest(self, repo: Repo, ref: Tag | Digest, content_type: str, data: bytes) -> PushedManifest:
        """Validate, check that everything it references is here, store, link, tag, index its subject."""
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type in GENERIC_TYPES:
            media_type = sniff_media_type(data) or media_type
        if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
            raise errors.ManifestInvalid("Docker schema 1 manifests are not accepted; push schema 2 or OCI")
        if media_type not in MANIFEST_TYPES:
            raise errors.ManifestInvalid(
                f"unsupported manifest media type {media_type!r}", detail={"mediaType": media_type[:200]}
            )
        try:
            manifest = parse_manifest(data, media_type)
        except errors.DigestInvalid as exc:
            raise errors.ManifestInvalid(f"manifest names an invalid digest: {exc.message}") from None
        digest = Digest.of(data, ref.algorithm if isinstance(ref, Digest) else "sha256")
        if isinstance(ref, Digest) and ref != digest:
            raise errors.DigestInvalid(
                f"manifest hashes to {digest}, not {ref}", detail={"expected": str(ref), "actual": str(digest)}
            )
        await self._check_references(repo, manifest)
        if await self._store.size(digest) is None:
            await self._store.put(data, digest)
        await self._index.put_manifest(digest, ManifestRecord(media_type, len(data)))
        await self._blob_arrived(repo, digest, "manifest")
        tag = ref.name if isinstance(ref, Tag) else None
        if tag is not None:
            await self._index.put_tag(repo, tag, TagRecord(digest, media_type, len(data), self._clock()))
        if manifest.subject is not None:
            await self._index.add_referrer(repo.path, manifest.subject.digest, _referrer(digest, len(data), manifest))
        subject = manifest.subject.digest if manifest.subject else None
        log.info("pushed manifest %s to %s%s", digest, repo.path, f" as {tag}" if tag else "")
        return PushedManifest(digest, media_type, len(data), tag, subject)

    async def _check_references(self, repo: Repo, manifest: Manifest) -> None:
        """Every child manifest of an index, and the config and every layer of an image, must be here. The
        ``subject`` need not be (OCI 1.1: a referrer may be pushed before its subject)."""
        missing: list[str] = []
        held: list[tuple[Digest, str, int]] = []
        for child in manifest.children:
            size = await self._store.size(child.digest)
            if await self._index.get_manifest(child.digest) is None or size is None:
                missing.append(str(child.digest))
            else:
                held.append((child.digest, "manifest", size))
        blobs = [*([manifest.config] if manifest.config else []), *manifest.layers]
        for blob in blobs:
            if blob.media_type in FOREIGN_LAYER_TYPES:
                continue
            size = await self._store.size(blob.digest)
            if size is None:
                missing.append(str(blob.digest))
            else:
                held.append((blob.digest, "blob", size))
        if missing:
            kind = "manifests" if manifest.children else "blobs"
            raise errors.ManifestBlobUnknown(
                f"the manifest references {kind} this registry does not hold: push them first",
                detail={"missing": missing[:50]},
            )
        for digest, kind, size in held:
            await self._hold(repo, digest, kind, size)

    async def _resolve(self, repo: Repo, ref: Tag | Digest) -> tuple[Digest, ManifestRecord]:
        if isinstance(ref, Tag):
            tag = await self._index.get_tag(repo, ref.name)
            digest = tag.digest if tag is not None else None
        else:
            digest = ref if await self._index.linked(repo.path, ref) else None
        record = await self._index.get_manifest(digest) if digest is not None else None
        if digest is None or record is None:
            raise errors.ManifestUnknown(
                f"manifest {ref} is not in {repo.path}", detail={"name": repo.path, "reference": str(ref)}
            )
        return digest, record

    async def manifest(self, repo: Repo, ref: Tag | Digest, accepted: frozenset[str]) -> ManifestAnswer:
        digest, record = await self._resolve(repo, ref)
        data = await self._store.read(digest)
        if data is None:
            raise errors.ManifestUnknown(f"manifest {ref} is not in {repo.path}", detail={"reference": str(ref)})
        return ManifestAnswer(digest, record.media_type, data)

    async def manifest_head(self, repo: Repo, ref: Tag | Digest, accepted: frozenset[str]) -> tuple[ManifestHead, bool]:
        digest, record = await self._resolve(repo, ref)
        return ManifestHead(digest, record.media_type, record.size), False

    async def delete_manifest(self, repo: Repo, ref: Tag | Digest) -> list[DeletedManifest]:
        """By tag: remove that tag only. By digest: remove the manifest, every tag pointing at it and its entry in
        its subject's referrers. What was deleted, for the notifications."""
        digest, record = await self._resolve(repo, ref)
        if isinstance(ref, Tag):
            await self._index.delete_tag(repo, ref.name)
            return [DeletedManifest(digest, record.media_type, record.size, ref.name)]
        for tag in await self._index.list_tags(repo):
            current = await self._index.get_tag(repo, tag)
            if current is not None and current.digest == digest:
                await self._index.delete_tag(repo, tag)
        data = await self._store.read(digest)
        if data is not None:
            try:
                subject = parse_manifest(data, record.media_type).subject
            except errors.RegistryError:
                subject = None
            if subject is not None:
                await self._index.remove_referrer(repo.path, subject.digest, digest)
        await self._index.unlink(repo.path, digest)
        await self._released(digest)
        if not await asyncio.to_thread(self._index.is_pushed_sync, digest):
            # No local repository holds it: no longer a root for gc, which then removes its bytes and what only it
            # referenced (a digest also pulled through is fetched again on its next pull).
            await self._index.delete_manifest(digest)
        log.info("deleted manifest %s from %s", digest, repo.path)
        return [DeletedManifest(digest, record.media_type, record.size, None)]

    # --- discovery -------------------------------------------------------------------------------------------
    async def list_tags(self, repo: Repo, n: int | None, last: str | None) -> tuple[list[str], str | None]:
        tags = [t for t in await self._index.list_tags(repo) if last is None or t > last]
        return (tags[:n] if n is not None else tags), None

    async def referrers(self, repo: Repo, subject: Digest, artifact_type: str | None) -> dict[str, Any]:
        """OCI 1.1 referrers of ``subject`` in a local repository, as an image index; an unknown subject has
        none (the API never answers 404 for a repository that exists)."""
        found = await self._index.referrers(repo.path, subject)
        manifests = [d for d in found if artifact_type is None or d.get("artifactType") == artifact_type]
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}

    def catalog(self, n: int | None, last: str | None) -> tuple[list[str], bool]:
        """One page of local repository names, and whether more follow."""
        names = [r for r in sorted(self._repos) if last is None or r > last]
        if n is None:
            return names, False
        return names[:n], len(names) > n


def _referrer(digest: Digest, size: int, manifest: Manifest) -> dict[str, Any]:
    """The descriptor of a referrer as the referrers API lists it: its artifactType is the manifest's own, else
    its config's media type (OCI distribution spec 1.1, "Listing Referrers")."""
    descriptor: dict[str, Any] = {"mediaType": manifest.media_type, "digest": str(digest), "size": size}
    artifact_type = manifest.artifact_type or (manifest.config.media_type if manifest.config else None)
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    if manifest.annotations:
        descriptor["annotations"] = manifest.annotations
    return descriptor
