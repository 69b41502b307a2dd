"""``--cache-size`` with human units and the ``[cache]`` table."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.cli import build_parser, config_from
from mirror.config import ConfigError, load, parse_size
from mirror.config.cache import CacheConfig, cache_config


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50GiB", 50 * 2**30),
        ("50G", 50 * 10**9),
        ("50GB", 50 * 10**9),
        ("1.5TiB", int(1.5 * 2**40)),
        ("500mib", 500 * 2**20),
        ("2 KiB", 2048),
        ("1234", 1234),
        ("0", 0),
        (4096, 4096),
    ],
    ids=lambda v: str(v),
)
def test_sizes_in_human_units(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-5", "5 XB", "5iB", "ten", "1e3"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


def test_cache_size_from_flag_env_and_file(tmp_path: Path) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(
        'cache_size = "1GiB"\n[cache]\nhigh_watermark = 0.9\nlow_watermark = 0.7\npins = ["alpine:3.19"]\n'
        'repo_allowlist = ["docker.io/library/alpine"]\ntop_repos = 5\n'
    )
    config = load({}, str(file), {})
    cache = cache_config(config)
    assert cache == CacheConfig(
        size=2**30, high_watermark=0.9, low_watermark=0.7, pins=("alpine:3.19",), top_repos=5,
        repo_allowlist=("docker.io/library/alpine",),
    )  # fmt: skip
    assert load({}, str(file), {"MIRROR_CACHE_SIZE": "2GiB"}).cache_size == 2 * 2**30
    args = build_parser().parse_args(["serve", "--config", str(file), "--cache-size", "50GiB", "--admin-api"])
    config = config_from(args)
    assert (config.cache_size, config.admin_api) == (50 * 2**30, True)
    assert load({}, None, {}).cache_size == 0  # no limit by default


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[cache]\nsize_limit = 5\n", "unknown keys in \\[cache\\]"),
        ("[cache]\nhigh_watermark = 0.5\nlow_watermark = 0.8\n", "low_watermark <= high_watermark"),
        ("[cache]\npins = 'alpine'\n", "list of strings"),
        ("[cache]\nflush_interval = 0\n", "flush_interval"),
        ('cache_size = "lots"\n', "not a size"),
    ],
    ids=["unknown key", "low above high", "pins not a list", "zero flush interval", "size not a size"],
)
def test_bad_cache_settings_say_what_is_wrong(tmp_path: Path, table: str, message: str) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(table)
    with pytest.raises(ConfigError, match=message):
        load({}, str(file), {})
