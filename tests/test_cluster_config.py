"""The ``[cluster]`` table: how replicas find Redis and each other (none: one node, no other service)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.config import ConfigError, load
from mirror.config.cluster import ClusterConfig, as_worker, cluster_config, worker_port
from mirror.config.storage import storage_config

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


def _load_env(tmp_path: Path, file_text: str, environ: dict[str, str]) -> ClusterConfig:
    file = tmp_path / "mirror.toml"
    file.write_text(file_text)
    return cluster_config(load({}, str(file), environ))


def test_the_environment_sets_the_keys_over_the_file(tmp_path: Path) -> None:
    """One ConfigMap for every pod: each replica's own advertise (and Redis, and secret file) from its environment."""
    (tmp_path / "secret").write_text(f"{SECRET}env\n")
    environ = {
        "MIRROR_CLUSTER_ADVERTISE": "http://10.0.0.7:5000",
        "MIRROR_CLUSTER_REDIS_URL": "redis://redis.internal:6380/1",
        "MIRROR_CLUSTER_SECRET_FILE": str(tmp_path / "secret"),
    }
    file_text = f'{STORAGE}[cluster]\nredis_url = "redis://127.0.0.1:6379/0"\nadvertise = "http://a:5000"\n'
    cluster = _load_env(tmp_path, file_text, environ)
    assert cluster == ClusterConfig(
        "redis://redis.internal:6380/1", "http://10.0.0.7:5000", f"{SECRET}env", str(tmp_path / "secret")
    )


def test_the_environment_alone_makes_the_cluster_table(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    environ = {
        "MIRROR_CLUSTER_ADVERTISE": "http://mirror-1:5000",
        "MIRROR_CLUSTER_REDIS_URL": "redis://redis:6379/0",
        "MIRROR_CLUSTER_SECRET_FILE": str(tmp_path / "secret"),
    }
    assert _load_env(tmp_path, STORAGE, environ).advertise == "http://mirror-1:5000"
    assert _load_env(tmp_path, STORAGE, {}) == ClusterConfig()  # none set, no table: one node


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MIRROR_CLUSTER_ADVERTISE": "10.0.0.7:5000"}, "advertise must be an http"),
        ({"MIRROR_CLUSTER_ADVERTISE": ""}, "needs advertise"),
        ({"MIRROR_CLUSTER_REDIS_URL": "http://redis:6379"}, "redis_url must be a redis://"),
        ({"MIRROR_CLUSTER_SECRET_FILE": "/nonexistent/secret"}, "secret or secret_file, not both"),
    ],
    ids=[
        "advertise without a scheme from the environment -> refused",
        "empty advertise from the environment -> refused",
        "not a redis URL from the environment -> refused",
        "secret_file from the environment beside the file's secret -> refused",
    ],
)
def test_values_from_the_environment_are_checked_like_the_file(
    tmp_path: Path, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _load_env(tmp_path, f"{STORAGE}[cluster]\n{GOOD}", environ)


def test_the_environment_cannot_make_a_cluster_without_the_bucket(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    environ = {
        "MIRROR_CLUSTER_ADVERTISE": "http://mirror-1:5000",
        "MIRROR_CLUSTER_REDIS_URL": "redis://redis:6379/0",
        "MIRROR_CLUSTER_SECRET_FILE": str(tmp_path / "secret"),
    }
    with pytest.raises(ConfigError, match='needs \\[storage\\] backend = "s3"'):
        _load_env(tmp_path, "", environ)


@pytest.mark.parametrize(
    ("advertise", "first", "second"),
    [
        ("http://mirror-0.mirror:5000", "http://mirror-0.mirror:5001", "http://mirror-0.mirror:5002"),
        ("https://[fd00::5]", "https://[fd00::5]:444", "https://[fd00::5]:445"),
    ],
)
def test_each_worker_of_a_replica_is_a_replica_on_its_own_port_and_directory(
    tmp_path: Path, advertise: str, first: str, second: str
) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(
        f'workers = 2\n{STORAGE}local_cache = "10GiB"\n'
        f'[cluster]\nredis_url = "redis://127.0.0.1:6379/0"\nadvertise = "{advertise}"\nsecret = "{SECRET}"\n'
    )
    config = load({"data_dir": str(tmp_path / "data")}, str(file), {})
    workers = [as_worker(config, slot) for slot in (0, 1)]
    assert [cluster_config(w).advertise for w in workers] == [first, second]
    assert [worker_port(config, slot) for slot in (0, 1)] == [
        int(first.rpartition(":")[2]),
        int(second.rpartition(":")[2]),
    ]
    assert [w.data_dir for w in workers] == [tmp_path / "data" / "workers" / "0", tmp_path / "data" / "workers" / "1"]
    assert [storage_config(w).local_cache for w in workers] == [5 * 2**30] * 2, "the local tier shared out"
    assert {w.coordination for w in workers} == {"process"}, "alone on its directory"
    assert cluster_config(workers[0]).secret == SECRET and storage_config(workers[0]).bucket == "mirror"
    assert cluster_config(config).advertise == advertise, "the replica's own config is left as it was"
