"""Tag TTL, revalidation with HEAD, and the stale window, with a controllable clock.

The upstream is the fake registry only because these tests count HEADs and GETs exactly and switch the upstream
off and on; the TTL and stale rules themselves are what is under test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from mirror.metrics import Metrics
from mirror.oci import errors
from mirror.oci.mediatypes import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from mirror.oci.reference import Digest, Repo, Tag
from mirror.pull.service import PullThrough, TagPolicy
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index
from mirror.upstream.client import UpstreamClient, UpstreamSettings
from tests.fakes.registry import FakeRegistry

REPO = Repo("docker.io", "library/app")
ANY = frozenset({"*/*"})
MakePull = Callable[..., PullThrough]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_pull(
    fake_upstream: tuple[FakeRegistry, TestServer], tmp_path: Path, clock: Clock
) -> AsyncIterator[MakePull]:
    _, server = fake_upstream
    made: list[tuple[PullThrough, UpstreamClient, Index]] = []

    def make(tag_ttl: float = 60.0, max_stale: float = 0.0) -> PullThrough:
        metrics = Metrics()
        client = UpstreamClient(UpstreamSettings("docker.io", str(server.make_url("")), timeout=2.0), metrics)
        index = Index(tmp_path)
        pull = PullThrough(
            BlobStore(tmp_path), index, {"docker.io": client}, {"docker.io": TagPolicy(tag_ttl, max_stale, 2.0)},
            metrics, clock=clock,
        )  # fmt: skip
        made.append((pull, client, index))
        return pull

    yield make
    for pull, client, index in made:
        await pull.close()
        await client.close()
        index.close()


async def test_within_ttl_no_upstream_request(
    fake_upstream: tuple[FakeRegistry, TestServer], make_pull: MakePull, clock: Clock
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_image("library/app", "1", [b"a"])
    pull = make_pull(tag_ttl=60)
    first = await pull.manifest(REPO, Tag("1"), ANY)
    assert str(first.digest) == digest
    before = len(fake.requests)
    clock.now += 59
    again = await pull.manifest(REPO, Tag("1"), ANY)
    assert again.digest == first.digest and not again.stale
    assert len(fake.requests) == before, "a tag within its TTL must not reach the upstream"


async def test_after_ttl_unchanged_digest_costs_one_head(
    fake_upstream: tuple[FakeRegistry, TestServer], make_pull: MakePull, clock: Clock
) -> None:
    fake, _ = fake_upstream
    fake.add_image("library/app", "1", [b"a"])
    pull = make_pull(tag_ttl=60)
    await pull.manifest(REPO, Tag("1"), ANY)
    gets_before = fake.count("GET", "manifests")
    clock.now += 61
    await pull.manifest(REPO, Tag("1"), ANY)
    assert fake.count("HEAD", "manifests") == 1
    assert fake.count("GET", "manifests") == gets_before, "unchanged digest must not cost a manifest GET"


async def test_after_ttl_moved_tag_serves_new_digest(
    fake_upstream: tuple[FakeRegistry, TestServer], make_pull: MakePull, clock: Clock
) -> None:
    fake, _ = fake_upstream
    fake.add_image("library/app", "1", [b"old"])
    pull = make_pull(tag_ttl=60)
    await pull.manifest(REPO, Tag("1"), ANY)
    new = fake.add_image("library/app", "1", [b"new"])  # the tag is re-pushed upstream
    clock.now += 30
    assert str((await pull.manifest(REPO, Tag("1"), ANY)).digest) != new  # still within TTL
    clock.now += 31
    assert str((await pull.manifest(REPO, Tag("1"), ANY)).digest) == new


async def test_ttl_zero_revalidates_every_time(
    fake_upstream: tuple[FakeRegistry, TestServer], make_pull: MakePull
) -> None:
    fake, _ = fake_upstream
    fake.add_image("library/app", "1", [b"a"])
    pull = make_pull(tag_ttl=0)
    for _ in range(3):
        await pull.manifest(REPO, Tag("1"), ANY)
    assert fake.count("HEAD", "manifests") == 2
    assert fake.count("GET", "manifests") == 1


@pytest.mark.parametrize(
    ("max_stale", "age", "served_stale"),
    [
        pytest.param(0, 10 * 86400, True, id="max_stale 0: stale however old"),
        pytest.param(3600, 1800, True, id="inside the stale window: stale answer"),
        pytest.param(3600, 7200, False, id="past the stale window: 503"),
    ],
)
async def test_stale_window(
    fake_upstream: tuple[FakeRegistry, TestServer],
    make_pull: MakePull,
    clock: Clock,
    max_stale: float,
    age: float,
    served_stale: bool,
) -> None:
    fake, _ = fake_upstream
    digest = fake.add_image("library/app", "1", [b"a"])
    pull = make_pull(tag_ttl=60, max_stale=max_stale)
    await pull.manifest(REPO, Tag("1"), ANY)
    fake.faults.down = True
    clock.now += age
    if served_stale:
        answer = await pull.manifest(REPO, Tag("1"), ANY)
        assert answer.stale and str(answer.digest) == digest
    else:
        with pytest.raises(errors.UpstreamUnavailable):
            await pull.manifest(REPO, Tag("1"), ANY)


async def test_tag_deleted_upstream_is_forgotten(
    fake_upstream: tuple[FakeRegistry, TestServer], make_pull: MakePull, clock: Clock
) -> None:
    fake, _ = fake_upstream
    fake.add_image("library/app", "1", [b"a"])
    pull = make_pull(tag_ttl=60)
    await pull.manifest(REPO, Tag("1"), ANY)
    del fake.manifests[("library/app", "1")]
    clock.now += 61
    with pytest.raises(errors.ManifestUnknown):
        await pull.manifest(REPO, Tag("1"), ANY)
    fake.faults.down = True  # a forgotten tag is not served stale afterwards
    with pytest.raises(errors.UpstreamUnavailable):
        await pull.manifest(REPO, Tag("1"), ANY)


async def test_manifest_by_digest_never_revalidated(
    fake_upstream: tuple[FakeRegistry, TestServer], make_pull: MakePull, clock: Clock
) -> None:
    fake, _ = fake_upstream
    digest = Digest.parse(fake.add_image("library/app", None, [b"a"]))
    pull = make_pull(tag_ttl=0)
    await pull.manifest(REPO, digest, ANY)
    fake.faults.down = True
    clock.now += 10 * 365 * 86400
    answer = await pull.manifest(REPO, digest, ANY)
    assert answer.digest == digest and not answer.stale
    assert fake.count("GET", "manifests") == 1 and fake.count("HEAD", "manifests") == 0


async def test_index_and_platform_manifests_cached_as_asked(
    fake_upstream: tuple[FakeRegistry, TestServer], make_pull: MakePull
) -> None:
    """A multi-arch index is stored byte-exact with its media type; platform manifests are fetched only when a
    client asks for them, never eagerly."""
    fake, _ = fake_upstream
    amd64 = fake.add_image("library/app", None, [b"amd64"], arch="amd64")
    arm64 = fake.add_image("library/app", None, [b"arm64"], arch="arm64")
    index_digest = fake.add_index("library/app", "multi", {"amd64": amd64, "arm64": arm64})
    pull = make_pull()
    index = await pull.manifest(REPO, Tag("multi"), frozenset({OCI_INDEX, OCI_MANIFEST}))
    assert index.media_type == OCI_INDEX and str(index.digest) == index_digest
    assert index.data == fake.manifests[("library/app", index_digest)][1]
    assert json.loads(index.data)["manifests"][0]["digest"] == amd64
    assert fake.count("GET", "manifests") == 1, "platform manifests must not be fetched eagerly"
    child = await pull.manifest(REPO, Digest.parse(amd64), frozenset({OCI_MANIFEST}))
    assert child.media_type == OCI_MANIFEST
    assert fake.count("GET", "manifests") == 2


async def test_accept_goes_upstream(fake_upstream: tuple[FakeRegistry, TestServer], make_pull: MakePull) -> None:
    """The client's Accept is what the upstream sees; a cached tag whose media type the client does not accept is
    resolved upstream again rather than handed out."""
    fake, _ = fake_upstream
    fake.add_image("library/app", "1", [b"a"])
    pull = make_pull()
    await pull.manifest(REPO, Tag("1"), frozenset({OCI_MANIFEST, DOCKER_MANIFEST}))
    assert set(fake.accepts[-1].split(", ")) == {OCI_MANIFEST, DOCKER_MANIFEST}
    requests = len(fake.requests)
    with pytest.raises(errors.ManifestUnknown):  # as Distribution: no OCI manifest for a Docker-only Accept
        await pull.manifest(REPO, Tag("1"), frozenset({DOCKER_MANIFEST}))
    assert len(fake.requests) > requests
    assert fake.accepts[-1] == DOCKER_MANIFEST
