"""What the mirror holds, as the web page's repository pages show it: a page of repository names, one
repository's tags (digest, platforms and which are cached, bytes on disk, last served, pinned), and one image's
manifest tree (an index's children, an image's config and layers with their sizes) with its referrers.

Everything here is blocking (diskcache, manifest files) and runs in a thread. A page reads what it shows and
nothing more: the names come from the index's paged listing (``MetadataIndex.repositories_sync``), the tags of
one repository a page at a time. ``visible`` decides which names a caller may see (the access policy's pull
permission, so a pushed repository's name never reaches a caller who could not pull it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mirror.oci.manifest import Manifest, parse_manifest
from mirror.oci.reference import LOCAL, Digest, Repo, Tag, format_image_ref
from mirror.storage.base import BlobStorage, MetadataIndex
from mirror.storage.entry import Entry

PAGE = 50  # repositories per page
TAGS_PAGE = 20  # tags of one repository per page (each reads its image's manifests)
MAX_DEPTH = 2  # an index of indexes of images at most (deeper manifests are listed, not opened)
SCANS = 20  # batches read at most to fill one page when the caller may see few of the names


@dataclass
class Page:
    items: list[Any]
    after: str | None = None  # where the next page starts, None on the last one


@dataclass
class Image:
    """One image (or index) as the repository page lists it."""

    digest: str
    media_type: str = ""
    cached: bool = False
    size_bytes: int = 0  # on disk: the manifest and every stored blob it references, each once
    last_served: float | None = None
    platforms: list[dict[str, Any]] = field(default_factory=list)  # {"platform", "digest", "cached"}
    pinned: bool = False


def client_name(repo: Repo, default_registry: str) -> str:
    """The name a client uses for ``repo`` on this mirror (what permissions match, what a pull names): a local
    repository's own name; the default upstream's path; another upstream's path after its host
    (``routing.route``'s host prefix)."""
    if repo.registry in (LOCAL, default_registry):
        return repo.path
    return f"{repo.registry}/{repo.path}"


def repositories(
    index: MetadataIndex, search: str, after: str, visible: Callable[[Repo], bool], limit: int = PAGE
) -> Page:
    """A page of repositories the caller may see, in name order, from ``after`` on."""
    shown: list[Repo] = []
    cursor = after
    for _ in range(SCANS):
        batch = index.repositories_sync(search, cursor, limit + 1)
        for repo in batch:
            if len(shown) == limit:
                return Page(shown, str(shown[-1]))
            if visible(repo):
                shown.append(repo)
        if len(batch) <= limit:
            return Page(shown)
        cursor = str(batch[-1])
    return Page(shown, cursor)  # many names hidden from this caller: the next page goes on from here


def tags(
    store: BlobStorage,
    index: MetadataIndex,
    table: Mapping[str, Entry],
    pins: Collection[str],
    repo: Repo,
    after: str = "",
    limit: int = TAGS_PAGE,
) -> Page:
    """One page of a repository's tags with their images. ``table`` is the usage table (read, never changed)."""
    names = [t for t in index.list_tags_sync(repo) if t > after]
    shown = []
    described: dict[Digest, Image] = {}  # tags often share an image (latest, 1, 1.2)
    for name in names[:limit]:
        record = index.get_tag_sync(repo.registry, repo.path, name)
        if record is None:
            continue
        if record.digest not in described:
            described[record.digest] = describe(store, index, table, record.digest)
        refs = (format_image_ref(repo, Tag.parse(name)), format_image_ref(repo, record.digest))
        image = replace(described[record.digest], pinned=any(ref in pins for ref in refs))
        shown.append({"tag": name, "image": image})
    return Page(shown, names[limit - 1] if len(names) > limit else None)


def describe(store: BlobStorage, index: MetadataIndex, table: Mapping[str, Entry], digest: Digest) -> Image:
    """An image's digest, media type, cached platforms, bytes on disk and last served time: each stored manifest
    read once (what ``storage.gc.closure`` walks, without asking the index about every layer)."""
    image = Image(str(digest), cached=str(digest) in table)
    manifest = _manifest(store, index, digest)
    keys = {str(digest)}
    if manifest is not None:
        image.media_type = manifest.media_type
        keys |= _blobs(manifest)
        for child in manifest.children:
            image.platforms.append(
                {"platform": child.platform or "", "digest": str(child.digest), "cached": str(child.digest) in table}
            )
            keys.add(str(child.digest))
            sub = _manifest(store, index, child.digest) if str(child.digest) in table else None
            keys |= _blobs(sub) if sub is not None else set()
    entries = [table[key] for key in keys if key in table]
    image.size_bytes = sum(e.size for e in entries)
    image.last_served = max((e.last_served for e in entries), default=None)
    return image


def belongs(index: MetadataIndex, repo: Repo, digest: Digest) -> bool:
    """Whether the image page of ``digest`` may be shown under ``repo``: a local repository holds it, or the
    repository's upstream sent it (the rule the registry API applies: ``Index.may_serve``)."""
    if index.get_manifest_sync(digest) is None:
        return False
    if repo.registry == LOCAL:
        return repo.path in index.pushed_in_sync(digest)
    return index.may_serve_sync(digest, repo.registry)


def tree(
    store: BlobStorage, index: MetadataIndex, table: Mapping[str, Entry], repo: Repo, digest: Digest, depth: int = 0
) -> dict[str, Any]:
    """The manifest tree of ``digest``: an index's children (each with its own tree when it is stored), an
    image's config and layers with their sizes and whether each is cached, and the referrers of a local image.
    Every node has every key (the template reads them all)."""
    manifest = _manifest(store, index, digest) if depth <= MAX_DEPTH else None
    node: dict[str, Any] = {
        "digest": str(digest),
        "cached": str(digest) in table,
        "manifest": manifest is not None,
        "media_type": "",
        "artifact_type": None,
        "subject": None,
        "config": None,
        "layers": [],
        "total": 0,
        "children": [],
        "referrers": [],
    }
    if manifest is None:
        return node
    node |= {
        "media_type": manifest.media_type,
        "artifact_type": manifest.artifact_type,
        "subject": str(manifest.subject.digest) if manifest.subject else None,
        "config": _blob(manifest.config, table) if manifest.config else None,
        "layers": [_blob(layer, table) for layer in manifest.layers],
        "total": sum(layer.size for layer in manifest.layers) + (manifest.config.size if manifest.config else 0),
        "referrers": list(index.referrers_sync(repo.path, digest)) if repo.registry == LOCAL else [],
    }
    for child in manifest.children:
        sub = tree(store, index, table, repo, child.digest, depth + 1)
        node["children"].append({"platform": child.platform or "", "size": child.size, **sub})
    return node


def _blobs(manifest: Manifest) -> set[str]:
    return {str(d.digest) for d in (*([manifest.config] if manifest.config else []), *manifest.layers)}


def _blob(desc: Any, table: Mapping[str, Entry]) -> dict[str, Any]:
    return {
        "digest": str(desc.digest),
        "media_type": desc.media_type,
        "size": desc.size,
        "cached": str(desc.digest) in table,
    }


def _manifest(store: BlobStorage, index: MetadataIndex, digest: Digest) -> Manifest | None:
    record = index.get_manifest_sync(digest)
    data = store.read_sync(digest) if record is not None else None
    if record is None or data is None:
        return None
    try:
        return parse_manifest(data, record.media_type)
    except Exception:  # a manifest the mirror stored but cannot read (quarantined by verify): shown as unknown
        return None
