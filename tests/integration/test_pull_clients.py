"""The clients users have pull through the mirror from a real CNCF Distribution upstream.

skopeo, containerd (``ctr --hosts-dir``), the Docker daemon (``--registry-mirror``) and podman (a
``registries.conf`` mirror) each pull ``docker.io/library/...`` images: a Docker schema 2 image, an OCI index and
a Docker manifest list. Every client runs in a private mount namespace whose ``/etc/hosts`` sends Docker Hub's
names to loopback, so a pull that passes went through the mirror. The clients reach the mirror through a TCP proxy
that can cut one blob download part-way (for the resume tests).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.clients import (
    Containerd,
    CuttingProxy,
    Docker,
    Podman,
    podman,
    skopeo,
    start_containerd,
    start_dockerd,
)
from tests.support.images import Image, manifest_digest, push_list, push_tar_image, random_files
from tests.support.ops import Mirror, Service, record_figures, start_registry, upstream_requests
from tests.support.plain_http import push_blob, sha256

pytestmark = pytest.mark.integration
KiB = 1024
MiB = 1024 * KiB


@dataclass
class World:
    registry: Service
    upstream: str  # http://127.0.0.1:PORT of the Distribution registry
    mirror: Mirror
    proxy: CuttingProxy  # clients talk to this, it forwards to the mirror

    @property
    def registry_log(self) -> Path:
        return self.registry.log

    @property
    def host(self) -> str:
        return self.proxy.url.removeprefix("http://")

    def blob_gets(self) -> int:
        """Blob GETs the upstream has answered so far."""
        return upstream_requests(self.registry_log, "GET", "/blobs/sha256:")

    def blob_hits(self) -> float:
        """Blob requests the mirror answered from its cache so far."""
        with urllib.request.urlopen(self.mirror.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("mirror_cache_requests_total{") and 'kind="blob"' in line and 'result="hit"' in line
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("pull")
    registry, upstream = start_registry(root / "registry", access_log=True)
    mirror = Mirror(root / "data", upstream, log=root / "mirror.log")
    proxy = CuttingProxy(("127.0.0.1", mirror.port))
    try:
        yield World(registry, upstream, mirror, proxy)
    finally:
        proxy.close()
        mirror.stop()
        registry.stop()


@dataclass
class Images:
    single: Image  # Docker schema 2, three layers
    single_ref: str
    index: str  # digest of an OCI index (amd64 + arm64)
    index_amd64: Image
    index_ref: str
    mlist: str  # digest of a Docker manifest list (amd64 + arm64)
    mlist_amd64: Image
    mlist_ref: str

    def refs(self) -> list[tuple[str, str, Image]]:
        """(repository:tag, top-level digest, the amd64 image a client unpacks)."""
        return [
            (self.single_ref, self.single.manifest, self.single),
            (self.index_ref, self.index, self.index_amd64),
            (self.mlist_ref, self.mlist, self.mlist_amd64),
        ]


def push_images(world: World, client: str) -> Images:
    """Fresh images for one client (distinct content per run: every client starts cold)."""
    up = world.upstream
    single = push_tar_image(
        up, f"library/{client}-app", "1.0",
        [{"etc/release": f"{client} app 1.0\n".encode()}, random_files("opt/data.bin", 300 * KiB),
         random_files("opt/more.bin", 200 * KiB)],
        docker=True,
    )  # fmt: skip
    oci = [
        push_tar_image(up, f"library/{client}-multi", None, [{"etc/arch": arch.encode()}, random_files("a.bin", 64 * KiB)],
                   arch=arch)
        for arch in ("amd64", "arm64")
    ]  # fmt: skip
    index = push_list(up, f"library/{client}-multi", "1.0", oci)
    docker = [
        push_tar_image(
            up, f"library/{client}-list", None, [{"etc/arch": f"list {arch}".encode()}], arch=arch, docker=True
        )
        for arch in ("amd64", "arm64")
    ]
    mlist = push_list(up, f"library/{client}-list", "1.0", docker, docker=True)
    return Images(
        single, f"library/{client}-app:1.0", index, oci[0], f"library/{client}-multi:1.0", mlist, docker[0],
        f"library/{client}-list:1.0",
    )  # fmt: skip


def assert_warm_pull_from_cache(world: World, pull: Callable[[], object]) -> None:
    """A second pull (the client's local copy removed first) is served from the mirror's disk: zero blob GETs
    reach the upstream, and the mirror counts blob hits."""
    gets, hits = world.blob_gets(), world.blob_hits()
    pull()
    assert world.blob_gets() == gets, "a warm pull fetched blobs from the upstream"
    assert world.blob_hits() > hits, "the warm pull did not come from the mirror's cache"


# --- skopeo ---------------------------------------------------------------------------------------------------------
def test_skopeo_copies_every_image_byte_for_byte(world: World, tmp_path: Path) -> None:
    images = push_images(world, "skopeo")
    for ref, digest, image in images.refs():
        target = tmp_path / ref.replace("/", "_")
        skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false", f"docker://{world.host}/{ref}",
               f"dir:{target}")  # fmt: skip
        assert (
            sha256((target / "manifest.json").read_bytes())
            == digest
            == manifest_digest(world.upstream, *ref.split(":"))
        )
        for blob in image.blobs:  # every blob of the amd64 image, verified by its name
            assert sha256((target / blob.split(":")[1]).read_bytes()) == blob

    def again() -> None:
        (tmp_path / "again").mkdir()
        for ref, _, _ in images.refs():
            skopeo("copy", "--all", "--src-tls-verify=false", f"docker://{world.host}/{ref}",
                   f"dir:{tmp_path / 'again' / ref.replace('/', '_')}")  # fmt: skip

    assert_warm_pull_from_cache(world, again)


def test_skopeo_cold_and_warm_pull_time_and_16_concurrent_cold_gets(world: World, tmp_path: Path) -> None:
    """Figures for the notes: a cold and a warm pull of an 8-layer image; 16 concurrent cold GETs of one blob make
    exactly one upstream GET on the real Distribution, and every client receives the verified bytes."""
    layers = [random_files(f"layer{i}.bin", 2 * MiB) for i in range(8)]
    image = push_tar_image(world.upstream, "library/figures", "1.0", layers, docker=True)
    timings = {}
    for run in ("cold", "warm"):
        start = time.monotonic()
        skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false",
               f"docker://{world.host}/library/figures:1.0", f"dir:{tmp_path / run}")  # fmt: skip
        timings[run] = time.monotonic() - start
        assert sha256((tmp_path / run / "manifest.json").read_bytes()) == image.manifest

    blob = os.urandom(8 * MiB)
    digest = push_blob(world.upstream, "library/herd", blob)

    def get(_: int) -> str:
        with urllib.request.urlopen(f"{world.mirror.url}/v2/library/herd/blobs/{digest}", timeout=120) as resp:
            return sha256(resp.read())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        received = list(pool.map(get, range(16)))
    assert received == [digest] * 16
    upstream_gets = upstream_requests(world.registry_log, "GET", f"/blobs/{digest}")
    assert upstream_gets == 1
    record_figures(
        "skopeo pull through the mirror (8 x 2 MiB layers) and 16 concurrent cold GETs (8 MiB blob)",
        cold_pull_s=round(timings["cold"], 3),
        warm_pull_s=round(timings["warm"], 3),
        image_bytes=sum(image.sizes.values()),
        concurrent_clients=16,
        upstream_gets=upstream_gets,
    )


# --- containerd ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    daemon = start_containerd(tmp_path_factory.mktemp("containerd"))
    try:
        yield daemon
    finally:
        daemon.stop()


def test_containerd_pulls_through_hosts_toml_mirror(world: World, containerd: Containerd) -> None:
    images = push_images(world, "containerd")
    hosts_dir = containerd.mirror_hosts_dir("mirror", world.proxy.url)
    for ref, digest, image in images.refs():
        name = f"docker.io/{ref}"
        containerd.pull(hosts_dir, name)
        listed = containerd.ctr("images", "ls", f"name=={name}")
        assert digest in listed, listed
        first = next(iter(image.files))
        assert containerd.read_file(name, first) == image.files[first]
    seen = [r for r in world.proxy.requests if "containerd-app" in r.split("\r\n", 1)[0]]
    assert seen and all("ns=docker.io" in r.split("\r\n", 1)[0] for r in seen), "containerd did not send ?ns="

    def again() -> None:
        containerd.namespace = "warm"  # a namespace has its own content: everything is fetched again
        try:
            for ref, _, _ in images.refs():
                containerd.pull(hosts_dir, f"docker.io/{ref}")
        finally:
            containerd.namespace = "mirror-test"

    assert_warm_pull_from_cache(world, again)


# --- the Docker daemon ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docker(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    daemon = start_dockerd(tmp_path_factory.mktemp("dockerd"), mirror=world.proxy.url)
    try:
        yield daemon
    finally:
        daemon.stop()


def repo_digests(docker: Docker, name: str) -> str:
    return docker("image", "inspect", "--format", "{{json .RepoDigests}}", name)


def test_docker_daemon_pulls_through_registry_mirrors(world: World, docker: Docker) -> None:
    images = push_images(world, "docker")
    for ref, digest, image in images.refs():
        name = ref.removeprefix("library/")  # what users type: docker pull nginx:1.0
        docker("pull", name)
        assert digest in repo_digests(docker, name)
        first = next(iter(image.files))
        assert docker.read_file(name, "/" + first) == image.files[first]

    def again() -> None:
        for ref, _, _ in images.refs():
            docker("rmi", ref.removeprefix("library/"))
        for ref, _, _ in images.refs():
            docker("pull", ref.removeprefix("library/"))

    assert_warm_pull_from_cache(world, again)


# --- podman --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def podman_client(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    client = podman(tmp_path_factory.mktemp("podman"))
    client.use_mirror(world.host)
    try:
        yield client
    finally:
        client.close()


def test_podman_pulls_through_registries_conf_mirror(world: World, podman_client: Podman) -> None:
    images = push_images(world, "podman")
    for ref, digest, image in images.refs():
        name = f"docker.io/{ref}"
        podman_client("pull", name)
        assert digest in podman_client("image", "inspect", "--format", "{{json .RepoDigests}}", name)
        first = next(iter(image.files))
        assert podman_client.read_file(name, "/" + first) == image.files[first]

    def again() -> None:
        for ref, _, _ in images.refs():
            podman_client("rmi", f"docker.io/{ref}")
        for ref, _, _ in images.refs():
            podman_client("pull", f"docker.io/{ref}")

    assert_warm_pull_from_cache(world, again)


# --- a download cut half-way is resumed with Range ----------------------------------------------------------------
def resumed(world: World, digest: str) -> list[str]:
    """Requests for ``digest`` the clients sent after the cut, which asked for a byte range."""
    return [r for r in world.proxy.requests if digest in r.split("\r\n", 1)[0] and "\r\nrange: bytes=" in r.lower()]


def mirror_answered_206(world: World, digest: str) -> bool:
    return any(digest in line and '" 206 ' in line for line in world.mirror.log.read_text().splitlines())


@pytest.mark.parametrize("client", ["containerd", "docker"])
def test_cut_mid_blob_is_resumed_with_range(client: str, world: World, request: pytest.FixtureRequest) -> None:
    image = push_tar_image(world.upstream, f"library/cut-{client}", "1.0", [random_files("big.bin", 4 * MiB)])
    layer = image.layers[0]
    world.proxy.cuts = 0
    world.proxy.cut_path, world.proxy.cut_after = f"/blobs/{layer}", MiB
    try:
        if client == "containerd":
            daemon: Containerd = request.getfixturevalue("containerd")
            daemon.pull(daemon.mirror_hosts_dir("cut", world.proxy.url), f"docker.io/library/cut-{client}:1.0")
            data = daemon.read_file(f"docker.io/library/cut-{client}:1.0", "big.bin")
        else:
            docker: Docker = request.getfixturevalue("docker")
            docker("pull", f"cut-{client}:1.0")
            data = docker.read_file(f"cut-{client}:1.0", "/big.bin")
    finally:
        world.proxy.cut_path = None
    assert world.proxy.cuts == 1, "the download was not cut"
    assert data == image.files["big.bin"]
    assert resumed(world, layer), f"{client} did not resume with Range"
    assert mirror_answered_206(world, layer), "the mirror did not answer the resumed request with 206"


# --- the upstream is down -----------------------------------------------------------------------------------------
def test_upstream_down_pulls_by_digest_and_by_tag(
    tmp_path: Path, world: World, containerd: Containerd, docker: Docker
) -> None:
    """Its own upstream and mirror (``--tag-ttl 0``: every tag lookup revalidates, so a pull by tag with the
    upstream gone is a stale answer). Warmed by skopeo, then the upstream stops; every client still pulls."""
    registry, upstream = start_registry(tmp_path / "registry")
    mirror = Mirror(tmp_path / "data", upstream, "--tag-ttl", "0", "--upstream-timeout", "3", log=tmp_path / "m.log")
    host = mirror.url.removeprefix("http://")
    try:
        image = push_tar_image(upstream, "library/offline", "1.0", [{"etc/offline": b"still here\n"}], docker=True)
        skopeo("copy", "--src-tls-verify=false", f"docker://{host}/library/offline:1.0", f"dir:{tmp_path / 'warm'}")
        registry.stop()

        skopeo("copy", "--src-tls-verify=false", f"docker://{host}/library/offline@{image.manifest}",
               f"dir:{tmp_path / 'by-digest'}")  # fmt: skip
        hosts_dir = containerd.mirror_hosts_dir("offline", mirror.url)
        containerd.pull(hosts_dir, "docker.io/library/offline:1.0")
        assert containerd.read_file("docker.io/library/offline:1.0", "etc/offline") == b"still here\n"
        containerd.pull(hosts_dir, f"docker.io/library/offline@{image.manifest}")

        normal, world.proxy.target = world.proxy.target, ("127.0.0.1", mirror.port)  # dockerd's mirror
        try:
            docker("pull", "offline:1.0")
            assert docker.read_file("offline:1.0", "/etc/offline") == b"still here\n"
            docker("pull", f"offline@{image.manifest}")
        finally:
            world.proxy.target = normal

        offline = podman(tmp_path / "podman")
        offline.use_mirror(host)
        try:
            offline("pull", "docker.io/library/offline:1.0")
            offline("pull", f"docker.io/library/offline@{image.manifest}")
        finally:
            offline.close()
        with urllib.request.urlopen(f"{mirror.url}/v2/library/offline/manifests/1.0", timeout=30) as resp:
            assert resp.headers["X-Mirror-Stale"] == "true"
            assert json.loads(resp.read())["config"]["digest"] == image.config
    finally:
        mirror.stop()
        registry.stop()
