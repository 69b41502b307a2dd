"""Settings come from defaults < TOML file < MIRROR_* environment < flags; bad settings say what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.cli import build_parser, config_from, main
from mirror.config import DOCKER_HUB_URL, ConfigError, load


def test_embedded_defaults() -> None:
    config = load({}, None, {})
    assert config.listen == "0.0.0.0:5000"
    assert config.host_port == ("0.0.0.0", 5000)
    assert config.data_dir == Path("mirror-data")
    (upstream,) = config.upstreams
    assert (upstream.registry, upstream.url, upstream.default) == ("docker.io", DOCKER_HUB_URL, True)
    assert upstream.tag_ttl == 300
    assert config.log_format == "text"


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text('listen = "127.0.0.1:7000"\ntag_ttl = 10\ndata_dir = "/from/file"\nlog_format = "json"\n')
    environ = {"MIRROR_TAG_TTL": "20", "MIRROR_DATA_DIR": "/from/env"}
    config = load({"data_dir": "/from/flag"}, str(file), environ)
    assert config.listen == "127.0.0.1:7000"  # file only
    assert config.upstreams[0].tag_ttl == 20  # env beats file
    assert config.data_dir == Path("/from/flag")  # flag beats env
    assert config.log_format == "json"


def test_flags_map_to_the_default_upstream(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    args = build_parser().parse_args(
        [
            "serve",
            "--listen", "127.0.0.1:5001",
            "--upstream", "http://127.0.0.1:9000",
            "--upstream-username", "ci",
            "--upstream-password-file", str(secret),
            "--tag-ttl", "0",
            "--max-stale", "3600",
            "--upstream-timeout", "2.5",
            "--log-level", "debug",
        ]
    )  # fmt: skip
    config = config_from(args)
    upstream = config.default_upstream
    assert (upstream.url, upstream.username, upstream.secret()) == ("http://127.0.0.1:9000", "ci", "hunter2")
    assert (upstream.tag_ttl, upstream.max_stale, upstream.timeout) == (0, 3600, 2.5)
    assert config.host_port == ("127.0.0.1", 5001)
    assert config.log_level == "debug"


def test_upstream_tables(tmp_path: Path) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(
        '[[upstreams]]\nregistry = "docker.io"\nurl = "https://registry-1.docker.io"\ndefault = true\n\n'
        '[[upstreams]]\nregistry = "ghcr.io"\nurl = "https://ghcr.io"\ntag_ttl = 60\n'
    )
    config = load({"tag_ttl": 5}, str(file), {})
    hub, ghcr = config.upstreams
    assert hub.default and hub.tag_ttl == 5  # flags apply to the default upstream
    assert not ghcr.default and ghcr.tag_ttl == 60


@pytest.mark.parametrize(
    ("toml", "flags", "message"),
    [
        pytest.param("", {"listen": "5000"}, "HOST:PORT", id="listen without host"),
        pytest.param("", {"listen": "h:99999"}, "HOST:PORT", id="port out of range"),
        pytest.param("", {"log_format": "xml"}, "log-format", id="unknown log format"),
        pytest.param("tag_tll = 3\n", {}, "tag_tll", id="typo in a key is named"),
        pytest.param("listen = [\n", {}, "not valid TOML", id="broken TOML"),
        pytest.param('[[upstreams]]\nregistry = "a.io"\n', {}, "registry and url", id="upstream without url"),
        pytest.param(
            '[[upstreams]]\nregistry="a.io"\nurl="http://a"\ndefault=true\n[[upstreams]]\nregistry="b.io"\nurl="http://b"\ndefault=true\n',
            {},
            "only one",
            id="two defaults",
        ),
        pytest.param("", {"tag_ttl": "soon"}, "invalid setting", id="non-numeric ttl"),
        pytest.param("[storaage]\nx = 1\n", {}, r"unknown tables in config file: \[storaage\]", id="typo in a table"),
        pytest.param("[cache.pinz]\n", {}, "unknown keys in \\[cache\\]: pinz", id="typo nested in a table"),
        pytest.param("", {"upload_max_sessions": "0"}, "upload_max_sessions must be", id="no upload sessions"),
    ],
)
def test_bad_settings(tmp_path: Path, toml: str, flags: dict[str, str], message: str) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load(flags, str(file), {})


def test_cli_reports_bad_config_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--listen", "nonsense"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_missing_password_file_is_a_config_error(tmp_path: Path) -> None:
    config = load({"upstream_username": "u", "upstream_password_file": str(tmp_path / "missing")}, None, {})
    with pytest.raises(ConfigError, match="password file"):
        config.default_upstream.secret()


@pytest.mark.parametrize(
    ("toml", "flags", "ui"),
    [
        ("", [], True),
        ("ui = false\n", [], False),
        ("ui = false\n", ["--ui", "on"], True),
        ("", ["--ui", "off"], False),
    ],
    ids=["on by default", "ui = false in TOML -> off", "--ui on beats the file", "--ui off -> off"],
)
def test_the_web_page_setting(tmp_path: Path, toml: str, flags: list[str], ui: bool) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(toml)
    args = build_parser().parse_args(["serve", "--config", str(file), *flags])
    assert config_from(args).ui is ui


@pytest.mark.parametrize(
    ("toml", "flags", "environ", "workers"),
    [
        ("", [], {}, 1),
        ("workers = 3\n", [], {}, 3),
        ("workers = 3\n", [], {"MIRROR_WORKERS": "2"}, 2),
        ("workers = 3\n", ["--workers", "4"], {"MIRROR_WORKERS": "2"}, 4),
        ("", ["--workers", "auto"], {}, len(os.sched_getaffinity(0))),
    ],
    ids=["1 by default", "TOML", "environment beats TOML", "flag beats both", "auto = the cores"],
)
def test_the_workers_setting(
    tmp_path: Path, toml: str, flags: list[str], environ: dict[str, str], workers: int
) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(toml)
    args = build_parser().parse_args(["serve", *flags])
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    assert load(values, str(file), environ).workers == workers


@pytest.mark.parametrize("value", ["0", "-1", "many", "257", "1.5"])
def test_a_bad_workers_count_is_refused_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match="workers must be a number from 1 to 256, or auto"):
        load({"workers": value}, None, {})
