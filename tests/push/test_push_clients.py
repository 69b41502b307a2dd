"""The everyday registry workflow with real clients against the real ``mirror`` process: ``docker tag``/``push``
(twice: "Layer already exists"), ``push --all-tags``, ``rmi``, ``pull`` back, ``docker login`` against htpasswd,
TLS without ``insecure-registries``; ``podman push`` and ``login``; ``skopeo copy --all`` of a multi-arch index
and ``skopeo delete``. Digests are compared after every round trip."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import Docker, Podman, podman, skopeo, start_dockerd
from tests.support.netns import namespace_host
from tests.support.ops import NO_UPSTREAM, Mirror, free_port, start_registry
from tests.support.pushing import (
    WebhookReceiver,
    docker_archive,
    get_json,
    htpasswd_file,
    manifest_digest,
    oci_layout,
    self_signed,
)

pytestmark = pytest.mark.integration
USER, PASSWORD = "alice", "correct horse"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    daemon = start_dockerd(tmp_path_factory.mktemp("dockerd"))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def image(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh image in the private dockerd (built in Python, loaded with ``docker load``)."""
    archive = docker_archive(tmp_path_factory.mktemp("image"), "local/app:1.0")
    docker("load", "-i", str(archive))
    return "local/app:1.0"


def pushed_digest(output: str, tag: str) -> str:
    match = re.search(rf"{re.escape(tag)}: digest: (sha256:[0-9a-f]{{64}})", output)
    assert match, output
    return match.group(1)


def leftovers(data_dir: Path) -> list[str]:
    return [p.name for p in (data_dir / "uploads").iterdir()] + [p.name for p in (data_dir / "tmp").iterdir()]


def test_docker_push_workflow(docker: Docker, image: str, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    with Mirror(tmp_path / "data", NO_UPSTREAM, listen=listen) as mirror:
        ref = f"{listen}/my/app"
        docker("tag", image, f"{ref}:1.0")
        first = docker("push", f"{ref}:1.0")
        assert "Pushed" in first
        digest = pushed_digest(first, "1.0")
        assert manifest_digest(mirror.url, "my/app", "1.0") == digest
        again = docker("push", f"{ref}:1.0")
        assert "Layer already exists" in again and "Pushed" not in again
        assert pushed_digest(again, "1.0") == digest

        docker("tag", image, f"{ref}:2.0")
        docker("tag", image, f"{ref}:latest")
        everything = docker("push", "--all-tags", ref)
        assert {pushed_digest(everything, tag) for tag in ("1.0", "2.0", "latest")} == {digest}
        assert get_json(f"{mirror.url}/v2/my/app/tags/list") == {"name": "my/app", "tags": ["1.0", "2.0", "latest"]}
        assert get_json(f"{mirror.url}/v2/_catalog") == {"repositories": ["my/app"]}

        docker("rmi", f"{ref}:1.0", f"{ref}:2.0", f"{ref}:latest")
        docker("pull", f"{ref}:2.0")
        assert docker("inspect", "--format", "{{index .RepoDigests 0}}", f"{ref}:2.0").strip() == f"{ref}@{digest}"

        request = urllib.request.Request(f"{mirror.url}/v2/my/app/manifests/{digest}", method="DELETE")
        with urllib.request.urlopen(request) as resp:
            assert resp.status == 202
        assert "manifest unknown" in docker("pull", f"{ref}:1.0", check=False).lower()
        assert get_json(f"{mirror.url}/v2/my/app/tags/list")["tags"] == []


def test_docker_pushes_an_image_pulled_through_the_mirror(docker: Docker, tmp_path: Path) -> None:
    """Pull ``library/base`` through the mirror (from a real Distribution upstream), ``docker tag`` it into a local
    repository of the same mirror and push: the layers are already in the store, so nothing is uploaded again."""
    layout = tmp_path / "layout"
    oci_layout(layout, "1.0")
    registry, url = start_registry(tmp_path / "upstream")
    upstream = url.removeprefix("http://")
    try:
        skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:1.0", f"docker://{upstream}/library/base:1.0")
        listen = f"127.0.0.1:{free_port()}"
        with Mirror(tmp_path / "data", f"http://{upstream}", listen=listen) as mirror:
            docker("pull", f"{listen}/library/base:1.0")
            docker("tag", f"{listen}/library/base:1.0", f"{listen}/my/app:1.0")
            output = docker("push", f"{listen}/my/app:1.0")
            assert "Pushed" not in output  # mounted from library/base or already there
            assert "Mounted from library/base" in output or "Layer already exists" in output
            digest = pushed_digest(output, "1.0")
            assert manifest_digest(mirror.url, "my/app", "1.0") == digest
            # Docker Hub's namespace stays pulled through: a push there is refused.
            refused = docker("push", f"{listen}/library/base:1.0", check=False)
            assert "denied" in refused.lower()
            docker("rmi", f"{listen}/my/app:1.0", f"{listen}/library/base:1.0")
            docker("pull", f"{listen}/my/app:1.0")
            assert docker("inspect", "--format", "{{index .RepoDigests 0}}", f"{listen}/my/app:1.0").strip() == (
                f"{listen}/my/app@{digest}"
            )
    finally:
        registry.stop()


def test_docker_login_then_push_with_htpasswd(docker: Docker, image: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    htpasswd = htpasswd_file(tmp_path / "htpasswd", USER, PASSWORD)
    listen = f"127.0.0.1:{free_port()}"
    with (
        WebhookReceiver() as webhook,
        Mirror(
            data_dir, NO_UPSTREAM, "--htpasswd", str(htpasswd), "--notify-url", webhook.url, listen=listen
        ) as mirror,
    ):
        ref = f"{listen}/team/app:1.0"
        docker("tag", image, ref)
        refused = docker("push", ref, check=False)
        assert "no basic auth credentials" in refused
        assert leftovers(data_dir) == []  # a push that fails auth leaves nothing behind
        assert get_json(f"{mirror.url}/v2/_catalog") == {"repositories": []}

        wrong = docker("login", "-u", USER, "--password-stdin", listen, stdin="wrong\n", check=False)
        assert "401 Unauthorized" in wrong
        assert "Login Succeeded" in docker("login", "-u", USER, "--password-stdin", listen, stdin=f"{PASSWORD}\n")
        digest = pushed_digest(docker("push", ref), "1.0")
        assert manifest_digest(mirror.url, "team/app", "1.0", AUTH) == digest
        docker("logout", listen)
        (event,) = webhook.wait_for(1)  # the push event, sent in the background
        assert event["action"] == "push"
        assert event["actor"] == {"name": USER}
        assert {k: event["target"][k] for k in ("repository", "tag", "digest")} == {
            "repository": "team/app",
            "tag": "1.0",
            "digest": digest,
        }
        assert event["request"]["useragent"].startswith("docker/")


def test_docker_push_over_tls_without_insecure_registries(docker: Docker, image: str, tmp_path: Path) -> None:
    """The mirror on a test host of its own (a network namespace behind a veth pair: Docker treats loopback
    registries as insecure, so only on another address is the certificate really checked), no
    ``insecure-registries``: trusted through certs.d, login and push work; an untrusted mirror is refused."""
    with namespace_host() as host:
        cert, key = self_signed(tmp_path, host.ip)
        htpasswd = htpasswd_file(tmp_path / "htpasswd", USER, PASSWORD)
        trusted, untrusted = f"{host.ip}:5000", f"{host.ip}:5001"  # the namespace is new: every port is free
        tls = ("--htpasswd", str(htpasswd), "--tls-cert", str(cert), "--tls-key", str(key))
        docker.trust(trusted, cert)
        with (
            Mirror(tmp_path / "data", NO_UPSTREAM, *tls, listen=trusted, ca=cert, host=host) as mirror,
            Mirror(tmp_path / "other", NO_UPSTREAM, *tls, listen=untrusted, ca=cert, host=host),
        ):
            login = docker("login", "-u", USER, "--password-stdin", trusted, stdin=f"{PASSWORD}\n")
            assert "Login Succeeded" in login
            docker("tag", image, f"{trusted}/secure/app:1.0")
            digest = pushed_digest(docker("push", f"{trusted}/secure/app:1.0"), "1.0")
            assert manifest_digest(mirror.url, "secure/app", "1.0", AUTH, ca=cert) == digest
            refused = docker("login", "-u", USER, "--password-stdin", untrusted, stdin=f"{PASSWORD}\n", check=False)
            assert "certificate signed by unknown authority" in refused


@pytest.fixture
def podman_client(tmp_path: Path) -> Iterator[Podman]:
    client = podman(tmp_path / "podman")
    yield client
    client.close()


def test_podman_push_and_login(podman_client: Podman, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    oci_layout(layout, "1.0")
    client = podman_client
    client("pull", f"oci:{layout}:1.0")
    image = client("images", "--quiet").split()[0]
    htpasswd = htpasswd_file(tmp_path / "htpasswd", USER, PASSWORD)
    open_listen, auth_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with (
        Mirror(tmp_path / "open", NO_UPSTREAM, listen=open_listen) as open_mirror,
        Mirror(tmp_path / "auth", NO_UPSTREAM, "--htpasswd", str(htpasswd), listen=auth_listen) as auth_mirror,
    ):
        digest_file = tmp_path / "digest"
        client("push", "--tls-verify=false", "--digestfile", str(digest_file), image,
               f"docker://{open_listen}/pod/app:1.0")  # fmt: skip
        assert manifest_digest(open_mirror.url, "pod/app", "1.0") == digest_file.read_text().strip()

        refused = client("push", "--tls-verify=false", image, f"docker://{auth_listen}/pod/app:1.0", check=False)
        assert "unauthorized" in refused.lower()
        assert "Login Succeeded" in client("login", "--tls-verify=false", "-u", USER, "-p", PASSWORD, auth_listen)
        client("push", "--tls-verify=false", "--digestfile", str(digest_file), image,
               f"docker://{auth_listen}/pod/app:1.0")  # fmt: skip
        assert manifest_digest(auth_mirror.url, "pod/app", "1.0", AUTH) == digest_file.read_text().strip()


def test_skopeo_copy_all_of_a_multi_arch_index_and_delete(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    index_digest = oci_layout(layout, "multi", ("amd64", "arm64"))
    listen = f"127.0.0.1:{free_port()}"
    with Mirror(tmp_path / "data", NO_UPSTREAM, listen=listen) as mirror:
        target = f"docker://{listen}/my/multi:1.0"
        skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:multi", target)
        assert manifest_digest(mirror.url, "my/multi", "1.0") == index_digest
        index = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", target))
        assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]

        back = tmp_path / "back"
        skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false", target, f"dir:{back}")
        assert "sha256:" + hashlib_sha256((back / "manifest.json").read_bytes()) == index_digest
        for child in index["manifests"]:
            saved = back / f"{child['digest'].split(':', 1)[1]}.manifest.json"
            assert "sha256:" + hashlib_sha256(saved.read_bytes()) == child["digest"]

        skopeo("delete", "--tls-verify=false", target)
        with pytest.raises(urllib.error.HTTPError) as missing:
            manifest_digest(mirror.url, "my/multi", "1.0")
        assert missing.value.code == 404


def hashlib_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
