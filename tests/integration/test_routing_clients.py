"""One mirror in front of several registries, addressed the three ways real clients do.

Upstreams: ``docker.io`` (the default) and ``ghcr.example:5000`` are two real CNCF Distribution registries,
``private.example`` is a third one behind htpasswd Basic auth (the mirror holds its credentials, the clients do
not), and ``tokens.example`` is the in-process fake with the Bearer token handshake (Distribution cannot issue
tokens without a separate auth server). The clients:

- containerd (``ctr --hosts-dir`` with one ``_default/hosts.toml``) pulls ``docker.io/...`` and
  ``ghcr.example:5000/...`` images and the mirror routes them by ``?ns=``;
- skopeo and podman use a ``registries.conf`` whose mirror ``location`` carries a path
  (``MIRROR/private.example``): the host-prefix dialect;
- skopeo with a bare name and the Docker daemon with ``--registry-mirror`` use the default upstream (the root
  dialect).

Every pull is checked against the upstream it must have come from (its access log) and the digests it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from aiohttp import web

from tests.fakes.registry import FakeRegistry
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
from tests.support.images import Image, manifest_digest, push_tar_image, random_files
from tests.support.ops import Mirror, Service, start_registry, upstream_requests
from tests.support.plain_http import sha256

pytestmark = pytest.mark.integration
KiB = 1024
GHCR = "ghcr.example:5000"
PRIVATE = "private.example"
TOKENS = "tokens.example"
USER, PASSWORD = "mirror", "upstream-secret"


class ThreadedFake:
    """The fake registry served from its own event loop thread, so that a mirror subprocess can reach it."""

    def __init__(self, fake: FakeRegistry):
        self.fake = fake
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.port = 0

        async def serve() -> None:
            self.runner = web.AppRunner(fake.app())
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]
            started.set()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        threading.Thread(target=main, daemon=True).start()
        assert started.wait(10), "the fake upstream did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass
class World:
    hub: tuple[Service, str]  # docker.io: Distribution, the default upstream
    ghcr: tuple[Service, str]  # ghcr.example:5000: Distribution
    private: tuple[Service, str]  # private.example: Distribution behind htpasswd
    tokens: ThreadedFake  # tokens.example: the fake with the token handshake
    mirror: Mirror
    proxy: CuttingProxy  # clients talk to this (it records their request lines), it forwards to the mirror

    @property
    def host(self) -> str:
        return self.proxy.url.removeprefix("http://")

    def gets(self, upstream: tuple[Service, str], repo: str) -> int:
        return upstream_requests(upstream[0].log, "GET", f"/v2/{repo}/")

    def request_lines(self, part: str) -> list[str]:
        lines = [urllib.parse.unquote(r.split("\r\n", 1)[0]) for r in self.proxy.requests]
        return [line for line in lines if part in line]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("routing")
    htpasswd = root / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    (root / "password").write_text(PASSWORD + "\n")
    with contextlib.ExitStack() as stack:
        started = {}
        for name in ("hub", "ghcr", "private"):
            started[name] = start_registry(
                root / name, access_log=True, htpasswd=htpasswd if name == "private" else None
            )
            stack.callback(started[name][0].stop)
        hub, ghcr, private = started["hub"], started["ghcr"], started["private"]
        tokens = ThreadedFake(FakeRegistry())
        stack.callback(tokens.close)
        tokens.fake.faults.token_auth = True
        config = root / "mirror.toml"
        config.write_text(
            f'[[upstreams]]\nregistry = "docker.io"\nurl = "{hub[1]}"\ndefault = true\n\n'
            f'[[upstreams]]\nregistry = "{GHCR}"\nurl = "{ghcr[1]}"\n\n'
            f'[[upstreams]]\nregistry = "{PRIVATE}"\nurl = "{private[1]}"\nusername = "{USER}"\n'
            f'password_file = "{root / "password"}"\n\n'
            f'[[upstreams]]\nregistry = "{TOKENS}"\nurl = "{tokens.url}"\n'
        )
        mirror = Mirror(root / "data", hub[1], "--config", str(config), log=root / "mirror.log")
        stack.callback(mirror.stop)
        proxy = CuttingProxy(("127.0.0.1", mirror.port))
        stack.callback(proxy.close)
        yield World(hub, ghcr, private, tokens, mirror, proxy)


def image_on(registry: str, repo: str, label: str) -> Image:
    return push_tar_image(
        registry, repo, "1.0", [{"etc/origin": f"{label}\n".encode()}, random_files("data.bin", 100 * KiB)], docker=True
    )


def copy_to_private(world: World, image: Image, repo: str) -> None:
    """Put an image on the htpasswd-protected upstream the way a user would: skopeo with credentials."""
    skopeo("copy", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
           "--dest-creds", f"{USER}:{PASSWORD}", f"docker://{world.hub[1].removeprefix('http://')}/{image.repo}:1.0",
           f"docker://{world.private[1].removeprefix('http://')}/{repo}:1.0")  # fmt: skip


def registries_conf(path: Path, mirror: str, *prefixes: str) -> Path:
    """A ``registries.conf`` where each registry prefix is pulled through ``mirror/<prefix>``."""
    path.write_text(
        "unqualified-search-registries = []\n"
        + "".join(
            f'\n[[registry]]\nprefix = "{p}"\nlocation = "{p}"\n\n[[registry.mirror]]\nlocation = "{mirror}/{p}"\n'
            "insecure = true\n"
            for p in prefixes
        )
    )
    return path


# --- skopeo: the prefix dialect (registries.conf mirror location with a path) and the root dialect ---------------
def test_skopeo_reaches_each_upstream_by_prefix_and_the_default_by_a_bare_name(world: World, tmp_path: Path) -> None:
    hub_image = image_on(world.hub[1], "library/routed", "docker hub")
    private_source = image_on(world.hub[1], "staging/private-app", "private")
    copy_to_private(world, private_source, "team/private-app")
    token_digest = world.tokens.fake.add_image("team/tokened", "1.0", [b"behind a token handshake"])
    conf = registries_conf(tmp_path / "registries.conf", world.host, PRIVATE, TOKENS)

    # The root dialect: a bare name goes to the default upstream.
    skopeo("copy", "--src-tls-verify=false", f"docker://{world.host}/library/routed:1.0", f"dir:{tmp_path / 'hub'}")
    assert sha256((tmp_path / "hub" / "manifest.json").read_bytes()) == hub_image.manifest
    assert world.gets(world.hub, "library/routed") >= 3  # manifest, config, layers

    # The prefix dialect: skopeo rewrites private.example/team/private-app to MIRROR/private.example/team/...
    skopeo("--registries-conf", str(conf), "copy", f"docker://{PRIVATE}/team/private-app:1.0",
           f"dir:{tmp_path / 'private'}")  # fmt: skip
    assert sha256((tmp_path / "private" / "manifest.json").read_bytes()) == private_source.manifest
    for blob in private_source.blobs:
        assert sha256((tmp_path / "private" / blob.split(":")[1]).read_bytes()) == blob
    assert world.gets(world.private, "team/private-app") >= 3  # with the mirror's credentials
    assert world.request_lines(f"/v2/{PRIVATE}/team/private-app/manifests/1.0")

    skopeo("--registries-conf", str(conf), "copy", f"docker://{TOKENS}/team/tokened:1.0", f"dir:{tmp_path / 'tok'}")
    assert sha256((tmp_path / "tok" / "manifest.json").read_bytes()) == token_digest
    assert world.tokens.fake.tokens_issued >= 1
    assert world.gets(world.ghcr, "team/private-app") == 0 and world.gets(world.hub, "team/private-app") == 0


def test_ns_and_host_prefix_reach_the_same_upstream_over_http(world: World) -> None:
    image = image_on(world.ghcr[1], "team/http", "ghcr over http")
    for path in (f"/v2/team/http/manifests/1.0?ns={GHCR}", f"/v2/{GHCR}/team/http/manifests/1.0"):
        request = urllib.request.Request(
            world.mirror.url + path, headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.headers["Docker-Content-Digest"] == image.manifest
    assert world.gets(world.hub, "team/http") == 0


def test_an_unconfigured_registry_is_refused_by_name(world: World) -> None:
    for path in ("/v2/team/app/manifests/1?ns=quay.io", "/v2/quay.io/team/app/manifests/1"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(world.mirror.url + path, timeout=30)
        assert caught.value.code == 404
        error = json.loads(caught.value.read())["errors"][0]
        assert error["code"] == "NAME_UNKNOWN" and "quay.io" in error["message"]


# --- containerd: the ns dialect -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    daemon = start_containerd(tmp_path_factory.mktemp("containerd"))
    try:
        yield daemon
    finally:
        daemon.stop()


def test_containerd_routes_by_ns_through_one_default_hosts_toml(world: World, containerd: Containerd) -> None:
    hub_image = image_on(world.hub[1], "library/ctr-routed", "hub for containerd")
    ghcr_image = image_on(world.ghcr[1], "team/ctr-routed", "ghcr for containerd")
    hosts_dir = containerd.root / "certs.d" / "routing"
    (hosts_dir / "_default").mkdir(parents=True, exist_ok=True)
    (hosts_dir / "_default" / "hosts.toml").write_text(
        f'[host."{world.proxy.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    for name, image in (("docker.io/library/ctr-routed:1.0", hub_image), (f"{GHCR}/team/ctr-routed:1.0", ghcr_image)):
        containerd.pull(hosts_dir, name)
        assert image.manifest in containerd.ctr("images", "ls", f"name=={name}")
        assert containerd.read_file(name, "etc/origin") == image.files["etc/origin"]
    hub_lines = world.request_lines("/v2/library/ctr-routed/")
    ghcr_lines = world.request_lines("/v2/team/ctr-routed/")
    assert hub_lines and all("ns=docker.io" in line for line in hub_lines), hub_lines
    assert ghcr_lines and all(f"ns={GHCR}" in line for line in ghcr_lines), ghcr_lines
    assert world.gets(world.ghcr, "team/ctr-routed") >= 3 and world.gets(world.hub, "team/ctr-routed") == 0
    assert world.gets(world.hub, "library/ctr-routed") >= 3


# --- podman: the prefix dialect -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def podman_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    client = podman(tmp_path_factory.mktemp("podman"))
    try:
        yield client
    finally:
        client.close()


def test_podman_pulls_a_private_registry_through_a_mirror_location_with_a_path(
    world: World, podman_client: Podman
) -> None:
    source = image_on(world.hub[1], "staging/podman-private", "private for podman")
    copy_to_private(world, source, "team/podman-app")
    podman_client.use_mirror(f"{world.host}/{PRIVATE}", prefix=PRIVATE)
    name = f"{PRIVATE}/team/podman-app:1.0"
    podman_client("pull", name)
    assert source.manifest in podman_client("image", "inspect", "--format", "{{json .RepoDigests}}", name)
    assert podman_client.read_file(name, "/etc/origin") == source.files["etc/origin"]
    assert world.request_lines(f"/v2/{PRIVATE}/team/podman-app/blobs/")
    assert world.gets(world.private, "team/podman-app") >= 3


# --- the Docker daemon: the root dialect --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docker(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    daemon = start_dockerd(tmp_path_factory.mktemp("dockerd"), mirror=world.proxy.url)
    try:
        yield daemon
    finally:
        daemon.stop()


def test_docker_daemon_registry_mirrors_reach_the_default_upstream(world: World, docker: Docker) -> None:
    image = image_on(world.hub[1], "library/docker-routed", "hub for dockerd")
    image_on(world.ghcr[1], "library/docker-routed", "the same name on another upstream")
    docker("pull", "docker-routed:1.0")
    assert image.manifest in docker("image", "inspect", "--format", "{{json .RepoDigests}}", "docker-routed:1.0")
    assert docker.read_file("docker-routed:1.0", "/etc/origin") == image.files["etc/origin"]
    assert world.request_lines("/v2/library/docker-routed/manifests/1.0")
    assert world.gets(world.ghcr, "library/docker-routed") == 0  # only the push above reached it (PUTs, HEADs)
    assert manifest_digest(world.ghcr[1], "library/docker-routed", "1.0") != image.manifest
