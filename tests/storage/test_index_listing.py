"""The disk index's paged listing of repository names (``Index.repositories_sync``, what the web page lists): a
name recorded twice is listed once, and names recorded before the listing existed are found once. The table of
pages and searches runs against both indexes in ``test_redis_index.py``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mirror.oci.reference import LOCAL, Digest, Repo
from mirror.storage.index import REPO_LIST_DONE, Index, TagRecord

RECORD = TagRecord(Digest.parse("sha256:" + "a" * 64), "application/vnd.oci.image.manifest.v1+json", 1, time.time())


@pytest.fixture
async def index(tmp_path: Path) -> Index:
    found = Index(tmp_path)
    await found.mark_pulled(Repo("docker.io", "library/alpine"))
    await found.put_tag(Repo("docker.io", "library/busybox"), "1", RECORD)  # a tag alone names it too
    await found.mark_pulled(Repo("ghcr.io", "org/a_b"))
    await found.mark_pulled(Repo("ghcr.io", "org/axb"))
    await found.add_local_repo("team/app")
    await found.put_tag(Repo(LOCAL, "team/app"), "x--y", RECORD)
    return found


def names(found: list[Repo]) -> list[str]:
    return [str(repo) for repo in found]


ALL = ["docker.io/library/alpine", "docker.io/library/busybox", "ghcr.io/org/a_b", "ghcr.io/org/axb", "local/team/app"]


async def test_a_tag_added_again_or_a_second_mark_lists_the_name_once(index: Index) -> None:
    await index.mark_pulled(Repo("docker.io", "library/alpine"))
    await index.put_tag(Repo("docker.io", "library/alpine"), "3", RECORD)
    assert names(index.repositories_sync()) == ALL
    assert index.repository_known_sync(Repo("docker.io", "library/alpine"))
    assert not index.repository_known_sync(Repo("docker.io", "library/nothing"))


async def test_names_recorded_before_the_listing_are_found_once(tmp_path: Path) -> None:
    """A data dir written before the listing keys: pulled markers, tag lists and local repositories only."""
    old = Index(tmp_path)
    raw = old._cache
    raw.delete(REPO_LIST_DONE)
    raw.set(("pulled", "docker.io", "library/old"), True)
    raw.set(("tags", "quay.io", "org/tagged"), ("1",))
    raw.set(("local-repos",), ("team/pushed",))
    assert names(old.repositories_sync()) == ["docker.io/library/old", "local/team/pushed", "quay.io/org/tagged"]
    raw.set(("pulled", "docker.io", "library/later"), True)  # the walk is done once, not per page
    assert "docker.io/library/later" not in names(old.repositories_sync())
    old.close()
