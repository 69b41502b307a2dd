"""One behaviour table for both indexes: the disk index of one node (``storage.index.Index``) and the index that
replicas share in Redis (``storage.redisindex.RedisIndex``, against a real ``redis-server``). Every case runs
against both, so the two cannot drift; then what only the shared one does: Redis gone is StoreUnavailable from
every kind of call, and the same index works again once Redis is back, without being made anew."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mirror.oci.reference import LOCAL, Digest, Repo
from mirror.storage import redisindex
from mirror.storage.base import RegistryIndex, StoreUnavailable
from mirror.storage.cluster import RedisLink
from mirror.storage.index import Index
from mirror.storage.records import ManifestRecord, TagRecord, manifest_from, manifest_json, tag_from, tag_json
from mirror.storage.redisindex import RedisIndex
from tests.support.redis import RedisServer, redis_fixture, redis_server  # noqa: F401 - redis_fixture: the fixture

OCI = "application/vnd.oci.image.manifest.v1+json"
A, B, C = (Digest.parse("sha256:" + c * 64) for c in "abc")
ALPINE, BUSYBOX = Repo("docker.io", "library/alpine"), Repo("docker.io", "library/busybox")
PORTED = Repo("localhost:5000", "library/alpine")  # a registry with a port: its own keys


def tag(digest: Digest, checked_at: float = 1700000000.5) -> TagRecord:
    return TagRecord(digest, OCI, 321, checked_at)


@pytest.fixture(params=["disk", "redis"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RegistryIndex]:
    if request.param == "disk":
        disk = Index(tmp_path)
        yield disk
        disk.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    link = RedisLink.connect(server.url)
    link.sync.flushdb()
    yield RedisIndex(link)
    await link.close()


# --- the behaviour table -------------------------------------------------------------------------------------
async def manifests(index: RegistryIndex) -> None:
    assert await index.get_manifest(A) is None
    await index.put_manifest(A, ManifestRecord(OCI, 10))
    await index.put_manifest(B, ManifestRecord("application/vnd.oci.image.index.v1+json", 20))
    assert await index.get_manifest(A) == index.get_manifest_sync(A) == ManifestRecord(OCI, 10)
    assert dict(index.iter_manifests_sync()) == {A: ManifestRecord(OCI, 10), B: index.get_manifest_sync(B)}
    await index.delete_manifest(A)
    index.delete_manifest_sync(B)
    assert (await index.get_manifest(A), index.get_manifest_sync(B), list(index.iter_manifests_sync())) == (
        None,
        None,
        [],
    )


async def tags(index: RegistryIndex) -> None:
    assert (await index.get_tag(ALPINE, "3"), await index.list_tags(ALPINE)) == (None, ())
    await index.put_tag(ALPINE, "3.19", tag(A))
    await index.put_tag(ALPINE, "3", tag(B))
    await index.put_tag(ALPINE, "3", tag(C, 1700000001.25))  # again: replaced, listed once
    assert (
        await index.get_tag(ALPINE, "3")
        == index.get_tag_sync("docker.io", "library/alpine", "3")
        == tag(C, 1700000001.25)
    )
    assert await index.list_tags(ALPINE) == index.list_tags_sync(ALPINE) == ("3", "3.19")
    assert sorted(index.iter_tags_sync()) == [
        ("docker.io", "library/alpine", "3", tag(C, 1700000001.25)),
        ("docker.io", "library/alpine", "3.19", tag(A)),
    ]
    await index.delete_tag(ALPINE, "3")
    index.delete_tag_sync("docker.io", "library/alpine", "3.19")
    assert (await index.get_tag(ALPINE, "3"), await index.list_tags(ALPINE), list(index.iter_tags_sync())) == (
        None,
        (),
        [],
    )


async def tags_per_repository(index: RegistryIndex) -> None:
    await index.put_tag(ALPINE, "1", tag(A))
    await index.put_tag(PORTED, "1", tag(B))
    await index.put_tag(Repo(LOCAL, "library/alpine"), "2", tag(C))
    assert (await index.get_tag(ALPINE, "1"), await index.get_tag(PORTED, "1")) == (tag(A), tag(B))
    assert (await index.list_tags(ALPINE), await index.list_tags(BUSYBOX)) == (("1",), ())
    assert await index.list_tags(Repo(LOCAL, "library/alpine")) == ("2",)
    assert index.get_tag_sync("localhost:5000", "library/alpine", "1") == tag(B)


async def pulled(index: RegistryIndex) -> None:
    assert not await index.pulled(ALPINE)
    await index.mark_pulled(ALPINE)
    await index.mark_pulled(ALPINE)
    assert await index.pulled(ALPINE) and not await index.pulled(BUSYBOX)
    assert index.repository_known_sync(ALPINE) and not index.repository_known_sync(BUSYBOX)
    await index.put_tag(BUSYBOX, "1", tag(A))  # a tag names a repository, without marking it pulled
    assert index.repository_known_sync(BUSYBOX) and not await index.pulled(BUSYBOX)


async def origins(index: RegistryIndex) -> None:
    assert await index.may_serve(A, "docker.io"), "nothing recorded: content from before origins, or a miss"
    await index.add_origin(A, "docker.io")
    await index.add_origin(A, "docker.io")
    await index.add_origin(A, "ghcr.io")
    assert await index.may_serve(A, "ghcr.io") and index.may_serve_sync(A, "docker.io")
    assert not await index.may_serve(A, "quay.io") and not index.may_serve_sync(A, "quay.io")


async def pushed_content_is_private(index: RegistryIndex) -> None:
    await index.link("team/app", A)
    assert not await index.may_serve(A, "docker.io") and not index.may_serve_sync(A, "docker.io")
    await index.add_origin(A, "docker.io")  # the same bytes fetched from an upstream too
    assert await index.may_serve(A, "docker.io")


async def links(index: RegistryIndex) -> None:
    assert not await index.unlink("team/app", A), "nothing linked: nothing removed"
    await index.link("team/app", A)
    await index.link("team/app", A)
    await index.link("team/other", A)
    await index.link("team/app", B)
    assert await index.linked("team/app", A) and not await index.linked("team/app", C)
    assert index.pushed_in_sync(A) == frozenset({"team/app", "team/other"})
    assert index.is_pushed_sync(A) and not index.is_pushed_sync(C)
    assert index.pushed_digests_sync() == {str(A), str(B)}
    assert await index.unlink("team/app", A)
    assert index.pushed_in_sync(A) == frozenset({"team/other"}) and index.pushed_digests_sync() == {str(A), str(B)}
    assert await index.unlink("team/other", A)
    assert not index.is_pushed_sync(A) and index.pushed_in_sync(A) == frozenset()
    assert index.pushed_digests_sync() == {str(B)}, "the last repository gone, the digest is no longer pushed"


async def local_repositories(index: RegistryIndex) -> None:
    assert index.local_repos_sync() == ()
    for name in ("team/b", "team/a", "team/b"):
        await index.add_local_repo(name)
    assert index.local_repos_sync() == ("team/a", "team/b")
    assert [str(r) for r in index.repositories_sync()] == ["local/team/a", "local/team/b"]
    assert index.repository_known_sync(Repo(LOCAL, "team/a")) and not index.repository_known_sync(Repo(LOCAL, "x"))


def referrer(digest: Digest, artifact: str) -> dict[str, object]:
    return {"mediaType": OCI, "digest": str(digest), "size": 7, "artifactType": artifact, "annotations": {}}


async def referrers(index: RegistryIndex) -> None:
    assert await index.referrers("team/app", A) == ()
    await index.add_referrer("team/app", A, referrer(B, "sbom"))
    await index.add_referrer("team/app", A, referrer(C, "sig"))
    await index.add_referrer("team/app", A, referrer(B, "sbom/v2"))  # put again: replaced, moved to the end
    await index.add_referrer("team/other", A, referrer(C, "other"))
    assert await index.referrers("team/app", A) == index.referrers_sync("team/app", A)
    assert await index.referrers("team/app", A) == (referrer(C, "sig"), referrer(B, "sbom/v2"))
    await index.remove_referrer("team/app", A, C)
    await index.remove_referrer("team/app", A, A)  # not a referrer: nothing happens
    assert await index.referrers("team/app", A) == (referrer(B, "sbom/v2"),)
    await index.remove_referrer("team/app", A, B)
    assert index.referrers_sync("team/app", A) == () and len(await index.referrers("team/other", A)) == 1


async def healthy(index: RegistryIndex) -> None:
    assert index.healthy_sync()


BEHAVIOUR: dict[str, Callable[[RegistryIndex], Awaitable[None]]] = {
    "manifest records: put, read by both getters, walked, deleted by both": manifests,
    "tags: put, replaced, listed in name order, walked, deleted by both": tags,
    "tags of one repository are not another's (a port, local)": tags_per_repository,
    "mark_pulled: pulled and known; a tag names a repository without marking it pulled": pulled,
    "origins: unrecorded may be served; recorded, only under the registries that sent it": origins,
    "pushed content is not served through a pull-through name unless fetched from it": pushed_content_is_private,
    "links: linked, pushed_in, pushed digests; the last unlink clears the mark; unlinking nothing -> False": links,
    "local repositories: their names sorted, listed as local/<name>": local_repositories,
    "referrers: in put order, a put again replaces and moves to the end, removed, per repository": referrers,
    "healthy_sync answers": healthy,
}


@pytest.mark.parametrize("case", BEHAVIOUR.values(), ids=BEHAVIOUR.keys())
async def test_behaviour(index: RegistryIndex, case: Callable[[RegistryIndex], Awaitable[None]]) -> None:
    await case(index)


# --- the web page's paged listing ----------------------------------------------------------------------------
ALL = ["docker.io/library/alpine", "docker.io/library/busybox", "ghcr.io/org/a_b", "ghcr.io/org/axb", "local/team/app"]


@pytest.mark.parametrize(
    ("search", "after", "limit", "expected"),
    [
        ("", "", 50, ALL),
        ("", "", 2, ALL[:2]),
        ("", "docker.io/library/busybox", 2, ALL[2:4]),
        ("", "local/team/app", 50, []),
        ("", "", 0, []),
        ("LIBRARY", "", 50, ALL[:2]),
        ("a_b", "", 50, ["ghcr.io/org/a_b"]),
        ("%", "", 50, []),
        ("team/", "", 50, ["local/team/app"]),
        ("o", "docker.io/library/alpine", 3, ALL[1:4]),
        ("app", "", 1, ["local/team/app"]),
    ],
    ids=[
        "everything in name order",
        "a first page",
        "the page after a name",
        "after the last name -> nothing",
        "limit 0 -> nothing",
        "search is case-insensitive",
        "_ is a literal, not LIKE's any character",
        "% is a literal, not LIKE's anything",
        "pushed repositories are listed as local/<name>",
        "a search after a name, up to the limit",
        "a search whose one match is past many names",
    ],
)
async def test_listing(
    index: RegistryIndex,
    monkeypatch: pytest.MonkeyPatch,
    search: str,
    after: str,
    limit: int,
    expected: list[str],
) -> None:
    monkeypatch.setattr(
        redisindex, "SEARCH_BUDGET", 2
    )  # Redis: a search looks at 2 names per call, so it takes several
    await index.mark_pulled(ALPINE)
    await index.put_tag(BUSYBOX, "1", tag(A))
    await index.mark_pulled(Repo("ghcr.io", "org/a_b"))
    await index.mark_pulled(Repo("ghcr.io", "org/axb"))
    await index.add_local_repo("team/app")
    await index.put_tag(Repo(LOCAL, "team/app"), "x--y", tag(A))
    assert [str(r) for r in index.repositories_sync(search, after, limit)] == expected


# --- the records' JSON (what Redis holds) ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [None, b"", b"not json", b"[1]", b'{"media_type": 1, "size": 2}', b'{"digest": "sha256:zz"}', 7],
    ids=["absent", "empty", "not JSON", "not an object", "wrong field type", "bad digest", "not bytes"],
)
def test_a_damaged_value_reads_as_not_recorded(value: object) -> None:
    assert manifest_from(value) is None and tag_from(value) is None


def test_records_round_trip_through_json() -> None:
    record = tag(A, time.time())
    assert tag_from(tag_json(record).encode()) == record
    assert manifest_from(manifest_json(ManifestRecord(OCI, 5)).encode()) == ManifestRecord(OCI, 5)


# --- Redis gone and back -------------------------------------------------------------------------------------
CALLS: dict[str, Callable[[RedisIndex], object]] = {
    "get_tag (the request path)": lambda i: i.get_tag(ALPINE, "1"),
    "put_tag (a MULTI/EXEC)": lambda i: i.put_tag(ALPINE, "1", tag(A)),
    "unlink (a Lua script)": lambda i: i.unlink("team/app", A),
    "get_manifest_sync (a thread)": lambda i: i.get_manifest_sync(A),
    "iter_manifests_sync (a walk)": lambda i: list(i.iter_manifests_sync()),
    "repositories_sync (the web page)": lambda i: i.repositories_sync("x"),
    "healthy_sync (/readyz)": lambda i: i.healthy_sync(),
}


async def test_redis_gone_is_store_unavailable_and_the_index_recovers_when_it_is_back(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as server:  # one of its own: this test stops it
        link = RedisLink.connect(server.url, timeout=2.0)
        index = RedisIndex(link)
        try:
            await index.put_tag(ALPINE, "1", tag(A))
            server.stop()
            for name, call in CALLS.items():
                with pytest.raises(StoreUnavailable, match="Redis"):
                    result = call(index)
                    if isinstance(result, Awaitable):
                        await result
                    pytest.fail(f"{name} answered without Redis")
            server.start()  # empty (no persistence): the same index object works again
            assert await index.get_tag(ALPINE, "1") is None
            await index.put_tag(ALPINE, "1", tag(B))
            assert index.get_tag_sync("docker.io", "library/alpine", "1") == tag(B)
        finally:
            await link.close()
