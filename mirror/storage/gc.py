"""Consistency and garbage collection of the store: start-up reconciliation, temp sweeps, unreferenced content,
re-hashing (verify), and what pins and pushes protect. Eviction to the byte cap is in ``eviction.py``.

Everything here is synchronous work through the store's and the index's ``*_sync`` methods (never a file
directly, so another ``BlobStorage`` can replace the disk), run in a thread (by the housekeeper, the admin API, or a
CLI command in its own process). It is safe while ``mirror serve`` runs on the same data dir:

- blob files are only ever created by rename and removed by unlink, so a reader that has a file open keeps
  reading it, and a reader that has not opened it yet gets a miss and fetches it again;
- temp files of fetches under way are young: sweeps while serving remove only temp files untouched for
  ``tmp_max_age``; start-up (before serving) removes them all;
- content a client was served within ``grace`` seconds is never collected (the serving process writes
  last-served times every ``flush_interval``, far below any sensible grace);
- whoever removes entries bumps the usage generation, and the serving process reloads its table.

``BlobStorage.quarantine_sync`` receives files that failed verification or do not belong in the store, for an
operator to look at; nothing reads them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mirror.oci.manifest import parse_manifest
from mirror.oci.reference import Digest, parse_image_ref
from mirror.storage.base import BlobStorage, MetadataIndex
from mirror.storage.entry import Entry
from mirror.storage.usage import Usage

log = logging.getLogger(__name__)


@dataclass
class Removal:
    digest: str
    size: int
    kind: str
    reason: str  # "unreferenced", "orphan", "corrupt", "evicted", "stray"
    last_served: float = 0.0


@dataclass
class Report:
    """What a sweep found and did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    removed: list[Removal] = field(default_factory=list)
    temp_files: int = 0
    records_dropped: int = 0  # index/usage records whose file is gone
    records_added: int = 0  # files found without a usage record
    tags_dropped: int = 0
    checked: int = 0  # files looked at (verify: hashed)
    table: dict[str, Entry] = field(default_factory=dict)  # reconcile: the usage table as it now is on disk
    generation: int = 0

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.removed)

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "removed": [r.__dict__ for r in self.removed],
            "removed_count": len(self.removed),
            "removed_bytes": self.bytes,
            "temp_files": self.temp_files,
            "records_dropped": self.records_dropped,
            "records_added": self.records_added,
            "tags_dropped": self.tags_dropped,
            "checked": self.checked,
        }


def reconcile_sync(store: BlobStorage, index: MetadataIndex, usage: Usage, dry_run: bool = False) -> Report:
    """Make the usage table and the index agree with the files on disk; the disk wins.

    A file without a usage entry gets one (size from the file, last served = its mtime, kind from the index);
    an entry or a manifest record without a file is dropped; a stray file in ``blobs/`` (not named by its
    digest) is quarantined; the pushed mark follows the index (what a local repository holds). A lost index is
    thereby rebuilt, and a stale one corrected, never trusted.
    """
    report = Report(dry_run=dry_run)
    entries, report.generation = usage.load_sync()
    manifests = {str(d): r for d, r in index.iter_manifests_sync()}
    pushed = index.pushed_digests_sync()
    seen: set[str] = set()
    fixes: dict[str, Entry] = {}
    for found in store.walk_sync():
        if not found.key:
            if found.size is not None and not dry_run:
                store.quarantine_sync(found.location, "stray-" + found.name)
            report.removed.append(Removal(found.name, found.size or 0, "stray", "stray"))
            continue
        assert found.size is not None
        key, size = found.key, found.size
        report.checked += 1
        seen.add(key)
        entry = entries.get(key)
        kind = "manifest" if key in manifests else "blob"
        local = key in pushed  # pushed is what a local repository holds in the index (``push.registry``)
        if entry is None or entry.size != size or entry.kind != kind or entry.local != local:
            report.records_added += entry is None
            fixed = Entry(size, entry.last_served if entry else found.mtime, kind, local)
            if entry is not None:
                fixed.repo = entry.repo
            fixes[key] = fixed
    gone = [key for key in entries if key not in seen]
    lost_manifests = [key for key in manifests if key not in seen]
    report.records_dropped = len(gone) + len(lost_manifests)
    if not dry_run:
        usage.put_many_sync(fixes)
        usage.delete_sync(gone)
        for key in lost_manifests:
            index.delete_manifest_sync(Digest.parse(key))
    entries.update(fixes)
    for key in gone:
        del entries[key]
    report.table = entries
    return report


# --- references: what manifests, pins and pushes keep ------------------------------------------------------------
def manifest_children(store: BlobStorage, digest: Digest, media_type: str) -> list[Digest]:
    """Digests a stored manifest references (children of an index, config and layers of an image); [] if the
    file is missing or is not a manifest."""
    data = store.read_sync(digest)
    if data is None:
        return []
    try:
        manifest = parse_manifest(data, media_type)
    except Exception:
        return []
    refs = [d.digest for d in (*manifest.children, *manifest.layers)]
    if manifest.config is not None:
        refs.append(manifest.config.digest)
    return refs


def closure(store: BlobStorage, index: MetadataIndex, roots: Iterable[Digest]) -> set[str]:
    """The roots and everything they reference, recursively (an index -> its manifests -> their blobs)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        digest = todo.pop()
        key = str(digest)
        if key in seen:
            continue
        seen.add(key)
        record = index.get_manifest_sync(digest)
        if record is not None:  # only manifests have children; layers are never opened
            todo.extend(manifest_children(store, digest, record.media_type))
    return seen


def split_image(image: str) -> tuple[str, str, str]:
    """``docker.io/library/alpine:3.19`` -> (registry, path, "3.19"); ``...@sha256:...`` -> (..., "sha256:...").
    Images are stored normalized (``oci.reference.format_image_ref``)."""
    name, tag, digest = parse_image_ref(image)
    registry, _, path = name.partition("/")
    if digest is not None:
        return registry, path, digest
    return registry, path, "latest" if tag is None else tag


def pinned_roots(index: MetadataIndex, pins: Iterable[str]) -> list[Digest]:
    """The manifest digests pinned images point to now (a tag through its cached tag record)."""
    roots = []
    for image in pins:
        registry, path, ref = split_image(image)
        if ":" in ref:
            with contextlib.suppress(Exception):
                roots.append(Digest.parse(ref))
            continue
        record = index.get_tag_sync(registry, path, ref)
        if record is not None:
            roots.append(record.digest)
    return roots


def protected_sync(
    store: BlobStorage,
    index: MetadataIndex,
    usage: Usage,
    config_pins: Iterable[str],
    local: Iterable[str] | None = None,
) -> set[str]:
    """Digests neither eviction nor gc may remove: pinned images (with all they reference) and pushed content
    with all a pushed manifest references. Pushed is what a local repository holds in the index (the push
    registry's ``("pushed", digest)`` links) or what is marked local in the usage table (``push.registry``
    records pushed content so; ``local`` defaults to the entries on disk)."""
    pins = set(config_pins) | set(usage.pins_sync())
    if local is None:
        local = [k for k, e in usage.entries_sync().items() if e.local]
    pushed = set(local) | index.pushed_digests_sync()
    return closure(store, index, [*pinned_roots(index, pins), *(Digest.parse(k) for k in pushed)])


# --- gc: unreferenced content ------------------------------------------------------------------------------------
def collect_sync(
    store: BlobStorage,
    index: MetadataIndex,
    usage: Usage,
    config_pins: Iterable[str] = (),
    grace: float = 3600.0,
    tmp_max_age: float = 3600.0,
    dry_run: bool = False,
    busy: Callable[[str], bool] = lambda key: False,
) -> Report:
    """``mirror gc``: reconcile, sweep old temp files, then remove blobs no stored manifest references.

    Roots are every stored manifest (tagged or pulled by digest), pinned images and pushed content. A blob outside
    their closure that nobody was served within ``grace`` seconds is removed: typically the layers of manifests
    that eviction removed. Tag records whose manifest is gone and that were not confirmed within ``grace`` go too.
    """
    report = reconcile_sync(store, index, usage, dry_run)
    report.temp_files = store.sweep_tmp_sync(tmp_max_age, dry_run)
    manifests = [d for d, _ in index.iter_manifests_sync()]
    keep = closure(store, index, manifests) | protected_sync(store, index, usage, config_pins)
    now = time.time()
    entries = usage.entries_sync()
    doomed = []
    for key, entry in entries.items():
        if key in keep or entry.local or busy(key) or now - entry.last_served < grace:
            continue
        doomed.append(Removal(key, entry.size, entry.kind, "unreferenced", entry.last_served))
    if not dry_run:
        removed = []
        for item in doomed:
            if _unlink(store, item.digest):
                removed.append(item)
        usage.delete_sync(r.digest for r in removed)
        doomed = removed
    report.removed.extend(doomed)
    for registry, path, tag, record in list(index.iter_tags_sync()):
        if store.size_sync(record.digest) is None and now - record.checked_at > grace:
            report.tags_dropped += 1
            if not dry_run:
                index.delete_tag_sync(registry, path, tag)
    if not dry_run and (report.removed or report.records_dropped):
        usage.bump_generation_sync()
    return report


def _unlink(store: BlobStorage, key: str) -> bool:
    try:
        store.delete_sync(Digest.parse(key))  # False when already gone: the entry goes too
        return True
    except OSError as exc:
        log.warning("cannot remove %s: %s", key, exc)
        return False


# --- verify ------------------------------------------------------------------------------------------------------
def verify_sync(
    store: BlobStorage,
    index: MetadataIndex,
    usage: Usage,
    progress: Callable[[int, int, str], None] = lambda done, total, key: None,
) -> Report:
    """Re-hash every stored file; quarantine the ones whose content no longer matches their digest.

    ``progress(bytes_done, bytes_total, digest)`` is called after each file. A quarantined file's entries are
    removed, so the next request fetches it again from the upstream.
    """
    report = Report()
    files = [(f.key, f.location, f.size) for f in store.walk_sync() if f.key and f.size is not None]
    total = sum(size for _, _, size in files)
    done = 0
    for key, location, size in files:
        digest = Digest.parse(key)
        intact = store.intact_sync(digest)
        if intact is None:  # evicted or collected meanwhile
            continue
        report.checked += 1
        done += size
        if not intact:
            target = store.quarantine_sync(location, key)
            log.error("%s does not match its digest: moved to %s", key, target)
            record = index.get_manifest_sync(digest)
            index.delete_manifest_sync(digest)
            usage.delete_sync([key])
            report.removed.append(Removal(key, size, "manifest" if record else "blob", "corrupt"))
        progress(done, total, key)
    if report.removed:
        usage.bump_generation_sync()
    return report
