"""``WWW-Authenticate`` parsing as Docker Hub, GHCR and Basic-auth registries send it."""

from __future__ import annotations

import pytest

from mirror.upstream.auth import Challenge, parse_challenge


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull"',
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/nginx:pull",
                },
            ),
            id="Docker Hub",
        ),
        pytest.param(
            'bearer realm="https://ghcr.io/token", service="ghcr.io"',
            Challenge("bearer", {"realm": "https://ghcr.io/token", "service": "ghcr.io"}),
            id="lower-case scheme, spaces after commas",
        ),
        pytest.param('Basic realm="Registry Realm"', Challenge("basic", {"realm": "Registry Realm"}), id="Basic"),
        pytest.param(
            'Bearer realm="https://r/token",scope="repository:a:pull,push"',
            Challenge("bearer", {"realm": "https://r/token", "scope": "repository:a:pull,push"}),
            id="comma inside a quoted scope",
        ),
    ],
)
def test_parse_challenge(header: str, expected: Challenge) -> None:
    assert parse_challenge(header) == expected


@pytest.mark.parametrize(
    "header",
    ["", "Negotiate abc", "Bearer service=x", "garbage"],
    ids=["empty", "unknown scheme", "Bearer without realm", "garbage"],
)
def test_unusable_challenges(header: str) -> None:
    assert parse_challenge(header) is None
