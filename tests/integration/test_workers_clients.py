"""Real clients through ``mirror serve --workers 2``: pulls cold and warm, a push and its pull back, and tags
served stale by every worker when the upstream is gone."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from pathlib import Path

import pytest

from tests.support.clients import skopeo
from tests.support.images import push_tar_image, random_files
from tests.support.ops import Mirror, start_registry, upstream_requests

pytestmark = pytest.mark.integration


def manifest_of(directory: Path) -> str:
    """The digest skopeo recorded for the manifest it copied into a ``dir:`` layout."""
    data = (directory / "manifest.json").read_bytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_skopeo_pulls_cold_then_warm_and_pushes_through_two_workers(tmp_path: Path) -> None:
    registry, upstream = start_registry(tmp_path / "registry", access_log=True)
    layers = [random_files(f"layer{n}", 2 << 20) for n in range(4)]
    image = push_tar_image(upstream, "library/busy", "1.0", layers, docker=True)
    try:
        with Mirror(tmp_path / "data", upstream, "--workers", "2") as mirror:
            host = mirror.url.removeprefix("http://")
            for run in ("cold", "warm"):
                skopeo("copy", "--src-tls-verify=false", f"docker://{host}/library/busy:1.0",
                       f"dir:{tmp_path / run}")  # fmt: skip
                assert manifest_of(tmp_path / run) == image.manifest
            log = tmp_path / "registry" / "registry.log"
            for layer in image.layers:
                assert upstream_requests(log, "GET", f"/blobs/{layer}") == 1  # the warm pull asked nothing
            # A push to the mirror (POST, PATCH, PUT per blob; then the manifest) and a pull of it back.
            skopeo("copy", "--dest-tls-verify=false", f"dir:{tmp_path / 'warm'}", f"docker://{host}/team/app:2.0")
            skopeo("copy", "--src-tls-verify=false", f"docker://{host}/team/app:2.0", f"dir:{tmp_path / 'back'}")
            assert manifest_of(tmp_path / "back") == image.manifest
            for layer in image.layers:
                assert (tmp_path / "back" / layer.partition(":")[2]).read_bytes() == (
                    tmp_path / "warm" / layer.partition(":")[2]
                ).read_bytes()
    finally:
        registry.stop()


def test_every_worker_serves_a_known_tag_stale_when_the_upstream_is_gone(tmp_path: Path) -> None:
    registry, upstream = start_registry(tmp_path / "registry")
    image = push_tar_image(upstream, "library/offline", "1.0", [{"etc/offline": b"still here\n"}], docker=True)
    flags = ("--workers", "2", "--tag-ttl", "0", "--upstream-timeout", "3")
    with Mirror(tmp_path / "data", upstream, *flags) as mirror:
        host = mirror.url.removeprefix("http://")
        skopeo("copy", "--src-tls-verify=false", f"docker://{host}/library/offline:1.0", f"dir:{tmp_path / 'warm'}")
        registry.stop()
        accept = "application/vnd.docker.distribution.manifest.v2+json"
        pids: set[str] = set()
        for _ in range(200):  # a new connection each, until both workers have answered (a busy machine may
            # wake the same worker for many in a row)
            request = urllib.request.Request(
                f"{mirror.url}/v2/library/offline/manifests/1.0", headers={"Accept": accept}
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200 and resp.headers["X-Mirror-Stale"]
                assert resp.headers["Docker-Content-Digest"] == image.manifest
                json.loads(resp.read())
            pids = set(re.findall(r"\[(\d+)\] aiohttp\.access: .*/manifests/1\.0", mirror.log.read_text()))
            if len(pids) == 2:
                break
        assert len(pids) == 2, "both workers served the tag stale"
        skopeo("copy", "--src-tls-verify=false", f"docker://{host}/library/offline:1.0", f"dir:{tmp_path / 'cold'}")
        assert manifest_of(tmp_path / "cold") == image.manifest
