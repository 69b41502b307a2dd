"""A pushed image deleted (its manifest by digest, then the blobs only it used) is collected by gc, on local disk as
on the bucket (``tests/integration/test_s3_push.py``): a manifest no local repository holds is no longer a root."""

from __future__ import annotations

import os
from pathlib import Path

from mirror.api.admin import ADMIN
from tests.conftest import MirrorFactory
from tests.support.ops import blob_files
from tests.support.plain_http import sha256
from tests.support.pushing import image_config, push_image


async def test_a_deleted_image_is_collected_and_a_shared_layer_stays(
    push_mirror: MirrorFactory, tmp_path: Path
) -> None:
    client = await push_mirror(extra={"cache": {"gc_grace": 0.0}})
    shared, own = os.urandom(3000), os.urandom(2000)
    gone = sha256(await push_image(client, "team/gone", "1", [shared, own]))
    kept = sha256(await push_image(client, "team/kept", "1", [shared], arch="arm64"))

    assert (await client.delete(f"/v2/team/gone/manifests/{gone}")).status == 202
    for blob in (sha256(image_config()), sha256(own)):
        assert (await client.delete(f"/v2/team/gone/blobs/{blob}")).status == 202
    removed = {r["digest"] for r in (await client.app[ADMIN].gc())["removed"]}

    assert removed == {gone, sha256(image_config()), sha256(own)}
    assert set(blob_files(tmp_path / "data")) == {kept, sha256(image_config("arm64")), sha256(shared)}
    assert (await client.get(f"/v2/team/kept/blobs/{sha256(shared)}")).status == 200
