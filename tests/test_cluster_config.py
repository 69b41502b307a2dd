"""The ``[cluster]`` table: how replicas find Redis and each other (none: one node, no other service)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.config import ConfigError, load
from mirror.config.cluster import ClusterConfig, cluster_config

SECRET = "s" * 32
GOOD = f'redis_url = "redis://127.0.0.1:6379/0"\nadvertise = "http://mirror-0.mirror:5000"\nsecret = "{SECRET}"\n'


STORAGE = '[storage]\nbackend = "s3"\nbucket = "mirror"\n'


def _load(tmp_path: Path, table: str | None) -> ClusterConfig:
    file = tmp_path / "mirror.toml"
    file.write_text(f"{STORAGE}[cluster]\n{table}" if table is not None else "")
    return cluster_config(load({}, str(file), {}))


def test_without_a_cluster_table_the_mirror_is_one_node(tmp_path: Path) -> None:
    assert _load(tmp_path, None) == ClusterConfig()
    assert not ClusterConfig().enabled


def test_every_name_of_the_table(tmp_path: Path) -> None:
    cluster = _load(tmp_path, GOOD)
    assert cluster == ClusterConfig("redis://127.0.0.1:6379/0", "http://mirror-0.mirror:5000", SECRET)
    assert cluster.enabled


def test_the_secret_is_read_from_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(f"{SECRET}x\n")
    table = GOOD.replace(f'secret = "{SECRET}"', f'secret_file = "{tmp_path / "secret"}"')
    assert _load(tmp_path, table).secret == f"{SECRET}x"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (GOOD + 'redis = "x"\n', "unknown keys in \\[cluster\\]: redis"),
        (GOOD.replace("redis://", "http://"), "redis_url must be a redis://"),
        ('advertise = "http://a:5000"\n', "needs redis_url"),
        (GOOD.replace('advertise = "http://mirror-0.mirror:5000"', 'advertise = ""'), "needs advertise"),
        (GOOD.replace("http://mirror-0.mirror:5000", "mirror-0:5000"), "advertise must be an http"),
        (GOOD.replace(SECRET, "short"), "at least 16 characters"),
        (GOOD + 'secret_file = "/nonexistent/secret"\n', "secret or secret_file, not both"),
        (GOOD.replace(f'secret = "{SECRET}"', 'secret_file = "/nonexistent/secret"'), "secret_file /nonexistent"),
        (GOOD.replace('"redis://127.0.0.1:6379/0"', "6379"), "redis_url must be a string"),
    ],
    ids=[
        "misspelt key -> named",
        "not a redis URL -> refused",
        "no redis_url -> refused",
        "no advertise -> refused",
        "advertise without a scheme -> refused",
        "short secret -> refused",
        "secret and secret_file -> refused",
        "unreadable secret_file -> named",
        "redis_url not a string -> refused",
    ],
)
def test_bad_cluster_tables_are_refused_at_load(tmp_path: Path, table: str, message: str) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(f"{STORAGE}[cluster]\n{table}")
    with pytest.raises(ConfigError, match=message):
        load({}, str(file), {})


def test_a_cluster_needs_the_bucket(tmp_path: Path) -> None:
    """Replicas on local disks would each keep their own content: the cluster shares it through a bucket."""
    file = tmp_path / "mirror.toml"
    file.write_text(f"[cluster]\n{GOOD}")
    with pytest.raises(ConfigError, match='needs \\[storage\\] backend = "s3"'):
        load({}, str(file), {})
