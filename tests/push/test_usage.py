"""Pushed bytes are in the usage table from the moment they are pushed: the byte cap counts them, ``mirror stats``
(in its own process, beside the running server) and the admin API show them as stored and protected, before any
restart. Deleting takes the pushed mark off content no local repository holds any more (eviction and gc may then
remove it like any cached content)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from mirror.api.admin import ADMIN
from mirror.api.keys import USAGE
from tests.conftest import MirrorFactory
from tests.support.ops import Mirror, run_cli
from tests.support.plain_http import push_random_image, sha256
from tests.support.pushing import push_image

LAYER = 100_000  # bytes: "pushing 100 kB"


def admin_stats(mirror: Mirror) -> Any:
    with urllib.request.urlopen(mirror.url + "/admin/v1/stats", timeout=10) as resp:
        return json.loads(resp.read())


def test_pushed_bytes_are_stored_and_protected_before_any_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # No upstream answers: a push never asks one, and nothing here is pulled through.
    mirror = Mirror(data, "http://127.0.0.1:9", "--admin-api", "--cache-size", "10MiB", log=tmp_path / "mirror.log")
    try:
        image = push_random_image(mirror.url, "team/app", "1", [os.urandom(LAYER)])
        assert image["bytes"] > LAYER
        cli = json.loads(run_cli("stats", "--json", "--data-dir", str(data)).stdout)
        api = admin_stats(mirror)
        for stats in (cli, api):
            assert stats["size_bytes"] == image["bytes"]
            assert stats["protected_bytes"] == image["bytes"]
            assert stats["local_bytes"] == image["bytes"]
            assert stats["entries"] == {"blob": 2, "manifest": 1}
        assert "protected   " in run_cli("stats", "--data-dir", str(data)).stdout
    finally:
        mirror.stop()
    # A lost usage table is rebuilt at start-up from the disk, and the index says what is pushed.
    shutil.rmtree(data / "usage")
    mirror = Mirror(data, "http://127.0.0.1:9", "--admin-api", log=tmp_path / "mirror.log")
    try:
        stats = admin_stats(mirror)
        assert stats["size_bytes"] == stats["protected_bytes"] == stats["local_bytes"] == image["bytes"]
    finally:
        mirror.stop()


async def test_pushes_count_against_the_cap_and_deletes_release_them(push_mirror: MirrorFactory) -> None:
    client = await push_mirror(cache_size=10 * 2**20)
    usage, admin = client.app[USAGE], client.app[ADMIN]
    layer = os.urandom(LAYER)
    manifest = await push_image(client, "my/app", "1", [layer])
    assert usage.used() == usage.total >= LAYER + len(manifest)  # the cap sees them at once
    assert all(entry.local for entry in usage.table.values())
    stats = await admin.stats()
    assert stats["protected_bytes"] == stats["local_bytes"] == usage.total
    resp = await client.post(f"/v2/my/other/blobs/uploads/?mount={sha256(layer)}&from=my/app")
    assert resp.status == 201  # now held by two local repositories

    resp = await client.delete(f"/v2/my/app/manifests/{sha256(manifest)}")
    assert resp.status == 202
    assert not usage.table[sha256(manifest)].local  # no repository holds it: no longer pushed
    assert usage.table[sha256(layer)].local  # still linked into my/app (and my/other)
    resp = await client.delete(f"/v2/my/app/blobs/{sha256(layer)}")
    assert resp.status == 202
    assert usage.table[sha256(layer)].local  # my/other still holds it
    resp = await client.delete(f"/v2/my/other/blobs/{sha256(layer)}")
    assert resp.status == 202
    assert not usage.table[sha256(layer)].local
    assert sha256(layer) not in await admin.housekeeper.protected()

    # Now ordinary cached content: the next eviction may remove it (and gc the layer once no manifest names it).
    planned = {removal.digest for removal in await admin.housekeeper.plan(target=0)}
    assert {sha256(layer), sha256(manifest)} <= planned
