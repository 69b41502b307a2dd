"""A replica whose Redis went away keeps serving what it already holds: a full pull of an image it served before
(tag, manifest, config and layers) through the replica's local tier and memory, with the right bytes, while
``/readyz`` says it is unready (so a load balancer sends it nothing new) and what needs Redis is a 503. A real
SeaweedFS, a real ``redis-server``, a real Distribution upstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cluster_index import Upstream, cluster_config, error_code, get, replica, upstream
from tests.support.plain_http import pull
from tests.support.redis import redis_server
from tests.support.seaweed import Seaweed, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration
__all__ = ["upstream"]  # the fixture, imported for this module's tests


def test_a_replica_serves_what_it_holds_while_redis_is_down(
    upstream: Upstream, seaweed: Seaweed, tmp_path: Path
) -> None:
    with redis_server(tmp_path / "redis") as redis:
        config = cluster_config(tmp_path / "mirror.toml", seaweed, redis)
        config.write_text(config.read_text().replace("[storage]\n", '[storage]\nlocal_cache = "64MiB"\n'))
        with replica(tmp_path, "a", upstream, config) as a:
            cold = pull(a.url, "library/shared", "1")
            blob_gets = upstream.gets("/blobs/")
            redis.stop()
            try:
                assert get(f"{a.url}/readyz")[0] == 503, "unready: a load balancer sends it nothing new"
                assert pull(a.url, "library/shared", "1") == cold, "every digest checked by the puller"
                assert upstream.gets("/blobs/") == blob_gets, "from what it holds, not from the upstream"
                status, body = get(f"{a.url}/v2/library/shared/manifests/2")  # never looked up: needs Redis
                assert (status, error_code(body)) == (503, "UNAVAILABLE")
            finally:
                redis.start()
