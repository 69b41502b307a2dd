"""The ``[storage]`` table of the config file: where content is kept, read into a plain value for ``app`` (which
hands its fields to the store; ``storage`` never reads ``Config``).

With no ``[storage]`` table the backend is ``disk`` (``<data-dir>/blobs``) and nothing changes. With
``backend = "s3"`` content lives in an S3-compatible bucket (path-style addressing, so endpoints such as SeaweedFS
or MinIO work without wildcard DNS); the data dir keeps the temp files of writes and the metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from mirror.config import Config, ConfigError, parse_size

BACKENDS = ("disk", "s3")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    backend: str = "disk"
    endpoint_url: str | None = None  # None: AWS's own endpoint for ``region``
    bucket: str = ""
    region: str = "us-east-1"
    prefix: str = ""  # key prefix inside the bucket ("" or ending in "/", e.g. "mirror/")
    access_key: str | None = None  # None: AWS_ACCESS_KEY_ID (and the rest of botocore's usual chain)
    secret_key: str | None = None  # None: AWS_SECRET_ACCESS_KEY
    redirect: bool = False  # blob GETs answer 307 to a presigned URL of the object
    local_cache: int = 0  # bytes of hot blobs kept on local disk beside the bucket; 0: none

    @property
    def s3(self) -> bool:
        return self.backend == "s3"


def storage_config(config: Config, environ: Mapping[str, str] = os.environ) -> StorageConfig:
    """The ``[storage]`` table, validated; the defaults (disk) when there is none. Keys missing from the table are
    taken from the usual AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``)."""
    table = config.extra.get("storage", {})
    if not isinstance(table, dict):
        raise ConfigError("storage must be a table: [storage] backend = ...")
    unknown = set(table) - {f.name for f in fields(StorageConfig)}
    if unknown:
        raise ConfigError(f"unknown keys in [storage]: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key in ("backend", "endpoint_url", "bucket", "region", "prefix", "access_key", "secret_key"):
        if key in table:
            if not isinstance(table[key], str):
                raise ConfigError(f"[storage] {key} must be a string")
            values[key] = table[key]
    if "redirect" in table:
        if not isinstance(table["redirect"], bool):
            raise ConfigError("[storage] redirect must be true or false")
        values["redirect"] = table["redirect"]
    if "local_cache" in table:
        values["local_cache"] = parse_size(table["local_cache"])
    values.setdefault("access_key", environ.get("AWS_ACCESS_KEY_ID") or None)
    values.setdefault("secret_key", environ.get("AWS_SECRET_ACCESS_KEY") or None)
    storage = StorageConfig(**values)
    _check(storage)
    if storage.s3 and config.workers > 1 and "cluster" not in config.extra:
        # The workers of one bucket are replicas of a cluster (``config.cluster.as_worker``): Redis coordinates them.
        raise ConfigError('[storage] backend = "s3" with --workers above 1 needs [cluster]: each worker is a replica')
    return storage


def _check(storage: StorageConfig) -> None:
    if storage.backend not in BACKENDS:
        raise ConfigError(f"[storage] backend must be one of {', '.join(BACKENDS)}, got {storage.backend!r}")
    s3_only = ("endpoint_url", "bucket", "prefix", "redirect", "local_cache")
    if not storage.s3:
        given = [key for key in s3_only if getattr(storage, key) != getattr(StorageConfig(), key)]
        if given:
            raise ConfigError(f'[storage] {", ".join(given)} only apply to backend = "s3"')
        return
    if not storage.bucket:
        raise ConfigError('[storage] backend = "s3" needs bucket')
    if storage.endpoint_url is not None and not storage.endpoint_url.startswith(("http://", "https://")):
        raise ConfigError(f"[storage] endpoint_url must be an http:// or https:// URL, got {storage.endpoint_url!r}")
    if storage.prefix.startswith("/") or (storage.prefix and not storage.prefix.endswith("/")):
        raise ConfigError(
            f'[storage] prefix must be "" or a path ending in "/" (e.g. "mirror/"), got {storage.prefix!r}'
        )
    if (storage.access_key is None) != (storage.secret_key is None):
        raise ConfigError(
            "[storage] access_key and secret_key go together (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
