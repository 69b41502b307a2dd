"""Names, tags, digests and routing: plain tables of good and bad input."""

from __future__ import annotations

import pytest

from mirror.oci.errors import DigestInvalid, ManifestInvalid, ManifestUnknown, NameInvalid, NameUnknown, RegistryError
from mirror.oci.reference import Digest, Repo, Tag, lookup_reference, parse_reference, validate_name
from mirror.routing import route

HEX64 = "a" * 64


@pytest.mark.parametrize(
    "name",
    ["alpine", "library/alpine", "a/b/c/d", "my-app", "my__app", "my.app", "a0/b-1/c.2", "x" * 255],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("Alpine", id="upper case"),
        pytest.param("../etc/passwd", id="dot-dot traversal"),
        pytest.param("a/../b", id="dot-dot component"),
        pytest.param("/alpine", id="leading slash"),
        pytest.param("alpine/", id="trailing slash"),
        pytest.param("a//b", id="empty component"),
        pytest.param("-a", id="leading separator"),
        pytest.param("a_-b", id="mixed separators"),
        pytest.param("a___b", id="three underscores"),
        pytest.param("a b", id="space"),
        pytest.param("x" * 256, id="too long"),
        pytest.param("a\x00b", id="NUL byte"),
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid):
        validate_name(name)


@pytest.mark.parametrize("text", ["latest", "3.19", "v1.0_rc-1", "_x", "A" * 128])
def test_valid_tags(text: str) -> None:
    assert parse_reference(text) == Tag(text)


@pytest.mark.parametrize("text", ["", ".hidden", "-x", "a" * 129, "a/b", "tag with space", "tag\n"])
def test_invalid_tags(text: str) -> None:
    with pytest.raises(ManifestInvalid):
        Tag.parse(text)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param(".INVALID_MANIFEST_NAME", ManifestUnknown, id="malformed tag read -> MANIFEST_UNKNOWN (404)"),
        pytest.param("-x", ManifestUnknown, id="leading dash read -> MANIFEST_UNKNOWN (404)"),
        pytest.param("sha256:xyz", DigestInvalid, id="malformed digest read -> DIGEST_INVALID (400)"),
    ],
)
def test_lookup_of_malformed_references(text: str, error: type[RegistryError]) -> None:
    with pytest.raises(error) as info:
        lookup_reference(text)
    assert info.value.status == (404 if error is ManifestUnknown else 400)
    with pytest.raises((ManifestInvalid, DigestInvalid)):  # a write still refuses it as invalid (400)
        parse_reference(text)


def test_lookup_of_valid_references() -> None:
    assert lookup_reference("latest") == Tag("latest")
    assert lookup_reference(f"sha256:{HEX64}") == Digest.parse(f"sha256:{HEX64}")


def test_digest_round_trip() -> None:
    digest = Digest.parse(f"sha256:{HEX64}")
    assert (digest.algorithm, digest.hex, str(digest)) == ("sha256", HEX64, f"sha256:{HEX64}")
    assert Digest.parse(f"sha512:{'b' * 128}").algorithm == "sha512"
    assert Digest.of(b"") == Digest.parse("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"sha256:{'A' * 64}", id="upper-case hex"),
        pytest.param(f"sha256:{'a' * 63}", id="short"),
        pytest.param(f"sha256:{'a' * 65}", id="long"),
        pytest.param(f"sha512:{'a' * 64}", id="sha512 with sha256 length"),
        pytest.param(f"md5:{'a' * 32}", id="unsupported algorithm"),
        pytest.param(f"sha256:{'g' * 64}", id="not hex"),
        pytest.param(HEX64, id="no algorithm"),
        pytest.param("sha256:../../../etc/passwd", id="traversal"),
        pytest.param("sha256:", id="empty hex"),
    ],
)
def test_invalid_digests(text: str) -> None:
    with pytest.raises(DigestInvalid):
        Digest.parse(text)


def test_every_parse_error_is_a_registry_error_with_a_client_status() -> None:
    for bad, parser in ((".", Tag.parse), ("x", Digest.parse), ("A", validate_name)):
        with pytest.raises(RegistryError) as info:
            parser(bad)
        assert 400 <= info.value.status < 500


class Upstreams:
    def __init__(self, *names: str):
        self.names = set(names)

    def __contains__(self, registry: object) -> bool:
        return registry in self.names

    @property
    def default(self) -> str:
        return "docker.io"


UPSTREAMS = Upstreams("docker.io", "ghcr.io", "registry.local:5000")


@pytest.mark.parametrize(
    ("name", "ns", "expected"),
    [
        pytest.param("alpine", None, Repo("docker.io", "library/alpine"), id="bare name -> Docker Hub library/"),
        pytest.param("library/alpine", None, Repo("docker.io", "library/alpine"), id="library/ kept"),
        pytest.param("bitnami/redis", None, Repo("docker.io", "bitnami/redis"), id="user repo on Docker Hub"),
        pytest.param("org/app", "ghcr.io", Repo("ghcr.io", "org/app"), id="containerd ns= picks the upstream"),
        pytest.param("alpine", "docker.io", Repo("docker.io", "library/alpine"), id="ns=docker.io adds library/"),
        pytest.param("ghcr.io/org/app", None, Repo("ghcr.io", "org/app"), id="host prefix in the path"),
        pytest.param("docker.io/nginx", None, Repo("docker.io", "library/nginx"), id="docker.io prefix + library/"),
        pytest.param(
            "registry.local:5000/team/app", None, Repo("registry.local:5000", "team/app"), id="host:port prefix"
        ),
        pytest.param("index.docker.io/library/x", None, Repo("docker.io", "library/x"), id="Docker Hub alias"),
    ],
)
def test_route(name: str, ns: str | None, expected: Repo) -> None:
    assert route(name, ns, UPSTREAMS) == expected


@pytest.mark.parametrize(
    ("name", "ns", "error"),
    [
        pytest.param("org/app", "quay.io", NameUnknown, id="ns names an unconfigured registry -> NAME_UNKNOWN"),
        pytest.param("evil.example/x/y", None, NameUnknown, id="host prefix not configured -> NAME_UNKNOWN"),
        pytest.param("org/app", "not a host", NameInvalid, id="garbage ns -> NAME_INVALID"),
        pytest.param("ghcr.io/../x", None, NameInvalid, id="traversal after a host prefix"),
    ],
)
def test_route_refuses(name: str, ns: str | None, error: type[RegistryError]) -> None:
    with pytest.raises(error):
        route(name, ns, UPSTREAMS)
