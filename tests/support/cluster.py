"""What the cluster tests share: the config file of a replica on a SeaweedFS bucket and a Redis, and readings of
a replica's metrics and of the bucket."""

from __future__ import annotations

from pathlib import Path

from tests.support.ops import Mirror
from tests.support.seaweed import Seaweed, raw_client

SECRET = "cluster-secret-" + "x" * 24  # shared by every replica of a test (16 characters at least)


def replica_config(
    path: Path, seaweed: Seaweed, redis_url: str, prefix: str, advertise: str, secret: str = SECRET
) -> Path:
    """A replica's TOML file at ``path``: the bucket under ``prefix``, Redis at ``redis_url``, this replica
    reached at ``advertise``."""
    path.write_text(
        f'[storage]\nbackend = "s3"\nendpoint_url = "{seaweed.endpoint_url}"\nbucket = "{seaweed.bucket}"\n'
        f'region = "{seaweed.region}"\nprefix = "{prefix}"\naccess_key = "{seaweed.access_key}"\n'
        f'secret_key = "{seaweed.secret_key}"\n'
        f'[cluster]\nredis_url = "{redis_url}"\nadvertise = "{advertise}"\nsecret = "{secret}"\n'
    )
    return path


def metric(mirror: Mirror, name: str) -> float:
    """The sum of every series of ``name`` in the replica's /metrics (all its workers')."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in mirror.metrics().splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def bucket_keys(seaweed: Seaweed, prefix: str) -> dict[str, int]:
    """Key -> size of the objects under ``prefix`` (one page: the tests store fewer than 1000)."""
    listed = raw_client(seaweed.endpoint_url).list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix)
    return {item["Key"]: item["Size"] for item in listed.get("Contents", [])}
