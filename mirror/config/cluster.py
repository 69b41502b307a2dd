"""The ``[cluster]`` table of the config file: how replicas sharing one bucket find Redis and each other, read
into a plain value for ``app`` (which hands its fields on; nothing else reads ``Config`` for it).

With no ``[cluster]`` table the mirror is one node and needs no other service. With one, Redis at ``redis_url``
holds what the replicas share, each replica tells the others how to reach it (``advertise``), and every call
between replicas carries the shared secret (``secret``, or the contents of ``secret_file``).

What differs per replica (its own ``advertise``, say, in a Deployment whose pods share one ConfigMap) comes from
the environment: ``MIRROR_CLUSTER_ADVERTISE``, ``MIRROR_CLUSTER_REDIS_URL`` and ``MIRROR_CLUSTER_SECRET_FILE`` set
the same keys, over the file's (``load`` lays them into the table; the checks below apply to them all the same).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mirror.config import Config, ConfigError

MIN_SECRET = 16  # characters: a secret shorter than this is a typo or a placeholder, not a secret
# The keys the environment may set, environment over the file.
ENVIRONMENT = {
    "redis_url": "MIRROR_CLUSTER_REDIS_URL",
    "advertise": "MIRROR_CLUSTER_ADVERTISE",
    "secret_file": "MIRROR_CLUSTER_SECRET_FILE",
}


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    redis_url: str = ""  # "": no cluster (one node)
    advertise: str = ""  # how the other replicas reach this one, e.g. "http://mirror-0.mirror:5000"
    secret: str = ""  # shared by every replica; read from secret_file when that is given
    secret_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


def with_environment(tables: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The config file's tables with the ``MIRROR_CLUSTER_*`` variables laid over its ``[cluster]`` table (made
    from them alone when the file has none); the tables as they are when none is set."""
    given = {key: environ[name] for key, name in ENVIRONMENT.items() if name in environ}
    if not given:
        return dict(tables)
    table = tables.get("cluster", {})
    if not isinstance(table, Mapping):
        raise ConfigError('cluster must be a table: [cluster] redis_url = "redis://..."')
    return {**tables, "cluster": {**table, **given}}


def cluster_config(config: Config) -> ClusterConfig:
    """The ``[cluster]`` table, validated, with the secret read from ``secret_file``; the defaults (no cluster)
    when there is none."""
    table = config.extra.get("cluster")
    if table is None:
        return ClusterConfig()
    if not isinstance(table, dict):
        raise ConfigError('cluster must be a table: [cluster] redis_url = "redis://..."')
    unknown = set(table) - {f.name for f in fields(ClusterConfig)}
    if unknown:
        raise ConfigError(f"unknown keys in [cluster]: {', '.join(sorted(unknown))}")
    for key, value in table.items():
        if not isinstance(value, str):
            raise ConfigError(f"[cluster] {key} must be a string")
    cluster = ClusterConfig(**table)
    if cluster.secret_file:
        if cluster.secret:
            raise ConfigError("[cluster] give secret or secret_file, not both")
        try:
            secret = Path(cluster.secret_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"[cluster] secret_file {cluster.secret_file}: {e.strerror or e}") from None
        cluster = ClusterConfig(cluster.redis_url, cluster.advertise, secret, cluster.secret_file)
    _check(cluster)
    from mirror.config.storage import storage_config  # here: both build on mirror.config

    if not storage_config(config).s3:
        raise ConfigError('[cluster] needs [storage] backend = "s3": the replicas share their content through a bucket')
    return cluster


def _check(cluster: ClusterConfig) -> None:
    if not cluster.redis_url:
        raise ConfigError('[cluster] needs redis_url, e.g. "redis://127.0.0.1:6379/0"')
    if urlsplit(cluster.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"[cluster] redis_url must be a redis://, rediss:// or unix:// URL, got {cluster.redis_url!r}"
        )
    if not cluster.advertise:
        raise ConfigError(
            '[cluster] needs advertise: how the other replicas reach this one, e.g. "http://10.0.0.5:5000"'
        )
    parts = urlsplit(cluster.advertise)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"[cluster] advertise must be an http:// or https:// URL, got {cluster.advertise!r}")
    if len(cluster.secret) < MIN_SECRET:
        raise ConfigError(f"[cluster] needs secret (or secret_file) of at least {MIN_SECRET} characters")


def worker_port(config: Config, slot: int) -> int:
    """The port worker ``slot`` (0 .. 2 x workers - 1: ``workers.slots``) of a replica run with ``--workers N``
    listens on beside the shared one: the advertised port + 1 + ``slot``. The other replicas reach that worker there (a fetch it holds,
    an upload session it keeps), since the shared port lands on any worker."""
    parts = urlsplit(cluster_config(config).advertise)
    return (parts.port or (443 if parts.scheme == "https" else 80)) + 1 + slot


def as_worker(config: Config, slot: int) -> Config:
    """What worker ``slot`` of a replica serves with: a replica of its own, advertising its own port
    (``worker_port``), on ``<data-dir>/workers/<slot>`` (its temp files, its upload sessions and its share of the
    local tier: ``local_cache`` / N; the slots a reload's new generation takes keep tiers of their own, so the
    tiers together may hold up to twice ``local_cache``), alone there. Everything else the replicas share (the bucket, Redis) it
    shares with the other workers the same way."""
    cluster = dict(config.extra.get("cluster", {}))
    parts = urlsplit(cluster_config(config).advertise)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    cluster["advertise"] = urlunsplit(parts._replace(netloc=f"{host}:{worker_port(config, slot)}"))
    extra = {**config.extra, "cluster": cluster}
    from mirror.config.storage import storage_config  # here: both build on mirror.config

    shared = storage_config(config).local_cache
    if shared:
        extra["storage"] = {**config.extra.get("storage", {}), "local_cache": max(1, shared // config.workers)}
    return dataclasses.replace(
        config, data_dir=config.data_dir / "workers" / str(slot), extra=extra, coordination="process"
    )
