"""Accept negotiation against CNCF Distribution, which serves an OCI manifest only to an Accept naming its type:
a cold ``*/*`` is a 200 as a cached one is, and a Docker-only HEAD (Distribution: 404) never erases the tag."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mirror.oci.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from tests.conftest import MirrorFactory
from tests.support.ops import start_registry
from tests.support.plain_http import push_random_image

pytestmark = pytest.mark.integration
FULL_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))


async def test_accept_against_distribution(make_mirror: MirrorFactory, tmp_path: Path) -> None:
    registry, url = await asyncio.to_thread(start_registry, tmp_path / "registry")
    try:
        image = await asyncio.to_thread(push_random_image, url, "test/img", "v1", [os.urandom(1000)])
        client = await make_mirror(url, timeout=2.0, tag_ttl=0)
        path = "/v2/test/img/manifests/v1"
        for state in ("cold", "cached"):
            resp = await client.get(path, headers={"Accept": "*/*"})
            assert resp.status == 200, (state, await resp.text())
            assert resp.headers["Docker-Content-Digest"] == image["manifest"]
        assert (await client.head(path, headers={"Accept": DOCKER_MANIFEST})).status == 404
    finally:
        await asyncio.to_thread(registry.stop)
    resp = await client.get(path, headers={"Accept": FULL_ACCEPT})  # the upstream is gone: stale, not erased
    assert resp.status == 200, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == image["manifest"]
    assert resp.headers["X-Mirror-Stale"] == "true"
