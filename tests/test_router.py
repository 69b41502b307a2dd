"""The name router (``mirror.routing``) as plain tables: a client's name, ``?ns=`` and the local repositories ->
the repository it means, or the error it gets; image references as operators write them -> (repo, ref).

The same rules over HTTP with in-process upstreams are in tests/test_routing.py, with real clients in
tests/integration/test_routing_clients.py.
"""

from __future__ import annotations

import pytest

from mirror.oci.errors import (
    Denied,
    DigestInvalid,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    RegistryError,
)
from mirror.oci.reference import LOCAL, Digest, Repo, Tag, format_image_ref
from mirror.routing import RepoRules, Router, Upstreams, image
from mirror.storage.gc import split_image

HEX = "b" * 64
PUSHED = frozenset({"team/app", "alpine"})  # local repositories; "alpine" shadows Docker Hub's for bare reads


def local(name: str, ns: str | None) -> Repo | None:
    return Repo(LOCAL, name) if ns is None and name in PUSHED else None


def router() -> Router:
    rules = {
        "docker.io": RepoRules(deny=("library/forbidden",)),
        "ghcr.io": RepoRules(allow=("org/**",)),
        "registry.local:5000": RepoRules(),
    }
    upstreams = Upstreams("docker.io", rules, add=lambda registry: None, wildcard_hosts=("*.wild.test",))
    return Router(upstreams, local)


@pytest.mark.parametrize(
    ("name", "ns", "expected"),
    [
        pytest.param("team/app", None, Repo(LOCAL, "team/app"), id="pushed name -> the local repository"),
        pytest.param("alpine", None, Repo(LOCAL, "alpine"), id="pushed bare name shadows Docker Hub"),
        pytest.param("alpine", "docker.io", Repo("docker.io", "library/alpine"), id="ns= bypasses local repos"),
        pytest.param("docker.io/alpine", None, Repo("docker.io", "library/alpine"), id="host prefix bypasses local"),
        pytest.param("busybox", None, Repo("docker.io", "library/busybox"), id="bare name -> default + library/"),
        pytest.param("bitnami/redis", None, Repo("docker.io", "bitnami/redis"), id="user repo on the default"),
        pytest.param("team/app/x", None, Repo("docker.io", "team/app/x"), id="below a local name is not local"),
        pytest.param("org/app", "ghcr.io", Repo("ghcr.io", "org/app"), id="ns= picks the upstream"),
        pytest.param("ghcr.io/org/a/b", None, Repo("ghcr.io", "org/a/b"), id="host prefix, allow ** matches"),
        pytest.param("x", "registry.local:5000", Repo("registry.local:5000", "x"), id="ns= host:port, no library/"),
        pytest.param("registry-1.docker.io/x", None, Repo("docker.io", "library/x"), id="Docker Hub alias"),
        pytest.param("team/app", "a.wild.test", Repo("a.wild.test", "team/app"), id="wildcard host admitted"),
    ],
)
def test_resolve(name: str, ns: str | None, expected: Repo) -> None:
    assert router().resolve(name, ns) == expected


@pytest.mark.parametrize(
    ("name", "ns", "error"),
    [
        pytest.param("forbidden", None, Denied, id="deny pattern after library/ -> DENIED"),
        pytest.param("other/app", "ghcr.io", Denied, id="outside the allow list -> DENIED"),
        pytest.param("x/y", "quay.io", NameUnknown, id="ns= names an unconfigured registry -> NAME_UNKNOWN"),
        pytest.param("evil.example/x", None, NameUnknown, id="unconfigured host prefix -> NAME_UNKNOWN"),
        pytest.param("x", "wild.test", NameUnknown, id="wildcard pattern needs a subdomain -> NAME_UNKNOWN"),
        pytest.param("x", "not a host", NameInvalid, id="garbage ns -> NAME_INVALID"),
        pytest.param("Team/App", None, NameInvalid, id="upper case -> NAME_INVALID"),
        pytest.param("ghcr.io/../x", None, NameInvalid, id="traversal after a host prefix -> NAME_INVALID"),
    ],
)
def test_resolve_refuses(name: str, ns: str | None, error: type[RegistryError]) -> None:
    with pytest.raises(error):
        router().resolve(name, ns)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("alpine", Repo("docker.io", "library/alpine"), id="a pushed name still has its upstream"),
        pytest.param("team/app", Repo("docker.io", "team/app"), id="no local precedence"),
        pytest.param("library/forbidden", Repo("docker.io", "library/forbidden"), id="no allow/deny either"),
        pytest.param("ghcr.io/other/app", Repo("ghcr.io", "other/app"), id="host prefix"),
    ],
)
def test_upstream_is_routing_without_local_precedence(name: str, expected: Repo) -> None:
    assert router().upstream(name) == expected


@pytest.mark.parametrize(
    ("text", "repo", "ref", "normalized"),
    [
        pytest.param("alpine", Repo("docker.io", "library/alpine"), Tag("latest"), "docker.io/library/alpine:latest",
                     id="bare name -> Docker Hub library/ at latest"),
        pytest.param(" alpine:3.19 ", Repo("docker.io", "library/alpine"), Tag("3.19"),
                     "docker.io/library/alpine:3.19", id="tag, surrounding space"),
        pytest.param(f"ghcr.io/o/a@sha256:{HEX}", Repo("ghcr.io", "o/a"), Digest("sha256", HEX),
                     f"ghcr.io/o/a@sha256:{HEX}", id="digest on another registry"),
        pytest.param(f"a:1@sha256:{HEX}", Repo("docker.io", "library/a"), Digest("sha256", HEX),
                     f"docker.io/library/a@sha256:{HEX}", id="digest wins over a tag"),
        pytest.param("host:5000/app", Repo("host:5000", "app"), Tag("latest"), "host:5000/app:latest",
                     id="a port is not a tag"),
        pytest.param("Docker.IO/nginx:1", Repo("docker.io", "library/nginx"), Tag("1"),
                     "docker.io/library/nginx:1", id="host named in any case"),
        pytest.param("quay.io/x/y:v", Repo("quay.io", "x/y"), Tag("v"), "quay.io/x/y:v",
                     id="any registry, configured or not"),
    ],
)  # fmt: skip
def test_image(text: str, repo: Repo, ref: Tag | Digest, normalized: str) -> None:
    assert image(text) == (repo, ref)
    assert format_image_ref(repo, ref) == normalized
    assert split_image(normalized) == (repo.registry, repo.path, str(ref))  # gc reads the stored form back


def test_image_on_another_default_registry() -> None:
    assert image("team/app", "registry.local:5000") == (Repo("registry.local:5000", "team/app"), Tag("latest"))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param("", NameInvalid, id="empty"),
        pytest.param("ghcr.io/", NameInvalid, id="host without a path"),
        pytest.param("Alpine", NameInvalid, id="upper case name"),
        pytest.param("alpine@", DigestInvalid, id="empty digest"),
        pytest.param("alpine@md5:abc", DigestInvalid, id="unsupported digest"),
        pytest.param("alpine:-x", ManifestInvalid, id="malformed tag"),
    ],
)
def test_image_refuses(text: str, error: type[RegistryError]) -> None:
    with pytest.raises(error):
        image(text)
