"""A replica skips the bucket's HEAD for a blob its usage table does not list, and looks at the bucket again before
it asks the upstream: a blob another replica stored after this one last read the table (its flush interval here
is an hour) is still served from the bucket, with no upstream request. A real SeaweedFS, a real ``redis-server``,
a real Distribution upstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cluster_index import NAME, Upstream, cluster_config, get, replica, upstream
from tests.support.plain_http import pull
from tests.support.redis import redis_server
from tests.support.seaweed import Seaweed, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration
__all__ = ["upstream"]  # the fixture, imported for this module's tests


def test_a_blob_stored_by_another_replica_since_this_one_read_the_table_is_served_from_the_bucket(
    upstream: Upstream, seaweed: Seaweed, tmp_path: Path
) -> None:
    with redis_server(tmp_path / "redis") as redis:
        config = cluster_config(tmp_path / "mirror.toml", seaweed, redis)
        config.write_text(config.read_text() + "[cache]\nflush_interval = 3600\n")
        with replica(tmp_path, "a", upstream, config) as a, replica(tmp_path, "b", upstream, config) as b:
            cold = pull(a.url, NAME, "1")  # stored by A; B has not read A's records (it reads them hourly)
            blob_gets = upstream.gets("/blobs/")
            for layer in upstream.image["layers"]:
                status, body = get(f"{b.url}/v2/{NAME}/blobs/{layer}", "*/*")
                assert status == 200 and len(body) in (300_000, 1000)
            assert pull(b.url, NAME, "1") == cold, "every digest checked by the puller"
            assert upstream.gets("/blobs/") == blob_gets, "from the bucket: no upstream GET"
