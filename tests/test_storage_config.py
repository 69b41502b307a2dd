"""The ``[storage]`` table: where content is kept (disk by default, or an S3-compatible bucket)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mirror.config import ConfigError, load
from mirror.config.storage import StorageConfig, storage_config
from tests.support.ops import mirror_env

S3 = 'backend = "s3"\nbucket = "mirror"\n'


def _load(tmp_path: Path, table: str | None, environ: dict[str, str] | None = None) -> StorageConfig:
    file = tmp_path / "mirror.toml"
    file.write_text(f"[storage]\n{table}" if table is not None else "")
    return storage_config(load({}, str(file), environ or {}), environ or {})


def test_without_a_storage_table_content_stays_on_disk(tmp_path: Path) -> None:
    assert _load(tmp_path, None) == StorageConfig()
    assert not StorageConfig().s3


def test_every_name_of_the_table(tmp_path: Path) -> None:
    table = (
        'backend = "s3"\nendpoint_url = "http://127.0.0.1:18333"\nbucket = "mirror"\nregion = "eu-west-1"\n'
        'prefix = "cache/"\naccess_key = "K"\nsecret_key = "S"\nredirect = true\nlocal_cache = "20GiB"\n'
    )
    assert _load(tmp_path, table) == StorageConfig(
        backend="s3",
        endpoint_url="http://127.0.0.1:18333",
        bucket="mirror",
        region="eu-west-1",
        prefix="cache/",
        access_key="K",
        secret_key="S",
        redirect=True,
        local_cache=20 << 30,
    )


def test_credentials_from_the_aws_environment(tmp_path: Path) -> None:
    storage = _load(tmp_path, S3, {"AWS_ACCESS_KEY_ID": "EK", "AWS_SECRET_ACCESS_KEY": "ES"})
    assert (storage.access_key, storage.secret_key) == ("EK", "ES")
    storage = _load(tmp_path, S3 + 'access_key = "K"\nsecret_key = "S"\n', {"AWS_ACCESS_KEY_ID": "EK"})
    assert (storage.access_key, storage.secret_key) == ("K", "S")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (S3 + 'buckit = "x"\nendpoint = "y"\n', "unknown keys in \\[storage\\]: buckit, endpoint"),
        ('backend = "gcs"\n', "backend must be one of disk, s3"),
        ('backend = "s3"\n', "needs bucket"),
        (S3 + 'endpoint_url = "127.0.0.1:18333"\n', "endpoint_url must be an http"),
        (S3 + 'prefix = "cache"\n', "prefix must be"),
        (S3 + 'prefix = "/cache/"\n', "prefix must be"),
        (S3 + 'access_key = "K"\n', "access_key and secret_key go together"),
        (S3 + 'redirect = "yes"\n', "redirect must be true or false"),
        (S3 + 'local_cache = "lots"\n', "not a size"),
        (S3 + "bucket = 5\n", "not valid TOML"),  # the key given twice
        ('bucket = "mirror"\n', 'only apply to backend = "s3"'),
        ("region = 5\n", "region must be a string"),
    ],
    ids=[
        "misspelt keys -> named",
        "unknown backend -> refused",
        "s3 without a bucket -> refused",
        "endpoint_url without a scheme -> refused",
        "prefix without a trailing slash -> refused",
        "prefix with a leading slash -> refused",
        "access_key alone -> refused",
        "redirect not a bool -> refused",
        "local_cache not a size -> refused",
        "a key twice -> not TOML",
        "bucket with the disk backend -> refused",
        "region not a string -> refused",
    ],
)
def test_bad_storage_tables_are_refused_at_load(tmp_path: Path, table: str, message: str) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(f"[storage]\n{table}")
    with pytest.raises(ConfigError, match=message):
        load({}, str(file), {})


def test_workers_on_a_bucket_need_the_cluster_that_coordinates_them(tmp_path: Path) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(f"workers = 2\n[storage]\n{S3}")
    with pytest.raises(ConfigError, match=r"needs \[cluster\]: each worker is a replica"):
        load({}, str(file), {})


@pytest.mark.parametrize(
    ("module", "loads"),
    [("mirror.cli", True), ("mirror.app", True), ("mirror.storage.s3", False)],
    ids=["the CLI loads without aiobotocore", "the app loads without it", "the S3 store needs it"],
)
def test_the_disk_store_needs_no_s3_client(module: str, loads: bool) -> None:
    """aiobotocore is the optional extra ``s3``: without it (an import of it fails) the mirror still starts."""
    blocked = "import sys; sys.modules['aiobotocore'] = sys.modules['botocore'] = None; "
    result = subprocess.run([sys.executable, "-c", f"{blocked}import {module}"], env=mirror_env(), capture_output=True)
    assert (result.returncode == 0) == loads, result.stderr.decode()[-2000:]
