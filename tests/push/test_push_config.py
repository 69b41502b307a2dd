"""The push, access, TLS and webhook settings: the same keys as flags, ``MIRROR_*`` variables and TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.cli import build_parser, config_from
from mirror.config import ConfigError, NotificationsConfig, load


def test_defaults_are_safe_for_a_loopback_start() -> None:
    config = load({}, None, {})
    assert config.htpasswd is None
    assert config.anonymous_pull is True
    assert config.anonymous_push == "loopback"
    assert config.read_only is False
    assert config.push_prefixes == ()
    assert config.upload_max_age == 86400
    assert (config.tls_cert, config.tls_key) == (None, None)
    assert config.notifications == NotificationsConfig()


def test_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--htpasswd", "/etc/mirror/htpasswd", "--no-anonymous-pull", "--anonymous-push", "off",
         "--read-only", "--push-prefix", "team/", "--push-prefix", "ci/", "--upload-max-age", "600",
         "--tls-cert", "c.pem", "--tls-key", "k.pem", "--notify-url", "http://a/hook", "--notify-url", "http://b/hook"]
    )  # fmt: skip
    config = config_from(args)
    assert config.htpasswd == Path("/etc/mirror/htpasswd")
    assert config.anonymous_pull is False
    assert config.anonymous_push == "off"
    assert config.read_only is True
    assert config.push_prefixes == ("team/", "ci/")
    assert config.upload_max_age == 600
    assert (config.tls_cert, config.tls_key) == (Path("c.pem"), Path("k.pem"))
    assert config.notifications.urls == ("http://a/hook", "http://b/hook")


def test_toml_keys_and_notifications_table(tmp_path: Path) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(
        'htpasswd = "/etc/mirror/htpasswd"\ntls_cert = "c.pem"\ntls_key = "k.pem"\nanonymous_pull = false\n'
        'read_only = true\npush_prefixes = ["team/"]\nupload_max_age = 60\n'
        '[notifications]\nurls = ["http://hooks/a"]\nheaders = { Authorization = "Bearer x" }\n'
        "timeout = 2\nattempts = 9\nbackoff = 0.5\n"
    )
    config = load({"notify_urls": ["http://flag/hook"]}, str(file), {})
    assert config.htpasswd == Path("/etc/mirror/htpasswd")
    assert (config.tls_cert, config.tls_key) == (Path("c.pem"), Path("k.pem"))
    assert config.anonymous_pull is False and config.read_only is True
    assert config.push_prefixes == ("team/",)
    assert config.upload_max_age == 60
    assert config.notifications == NotificationsConfig(
        urls=("http://hooks/a", "http://flag/hook"),
        headers={"Authorization": "Bearer x"},
        timeout=2.0,
        attempts=9,
        backoff=0.5,
    )


def test_environment() -> None:
    environ = {
        "MIRROR_HTPASSWD": "/h",
        "MIRROR_READ_ONLY": "yes",
        "MIRROR_ANONYMOUS_PULL": "false",
        "MIRROR_PUSH_PREFIXES": "team/, ci/",
        "MIRROR_NOTIFY_URLS": "http://a,http://b",
    }
    config = load({}, None, environ)
    assert config.htpasswd == Path("/h")
    assert config.read_only is True and config.anonymous_pull is False
    assert config.push_prefixes == ("team/", "ci/")
    assert config.notifications.urls == ("http://a", "http://b")


@pytest.mark.parametrize(
    ("values", "toml", "message"),
    [
        pytest.param({"tls_cert": "c.pem"}, "", "go together", id="cert without key -> error"),
        pytest.param({"tls_key": "k.pem"}, "", "go together", id="key without cert -> error"),
        pytest.param({"anonymous_push": "everyone"}, "", "--anonymous-push", id="bad anonymous_push -> error"),
        pytest.param({}, "[notifications]\nurl = 'x'\n", r"unknown keys in \[notifications\]: url", id="typo in table"),
        pytest.param({}, "[notifications]\nheaders = 'x'\n", "headers must be a table", id="headers not a table"),
        pytest.param({}, "[notifications]\nattempts = 'many'\n", "invalid setting", id="attempts not a number"),
    ],
)
def test_bad_settings(tmp_path: Path, values: dict[str, str], toml: str, message: str) -> None:
    file = tmp_path / "mirror.toml"
    file.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load(values, str(file), {})


def test_no_upstream_may_be_called_local(tmp_path: Path) -> None:
    from mirror.app import create_app
    from mirror.config import Config, UpstreamConfig

    config = Config(
        data_dir=tmp_path,
        upstreams=(UpstreamConfig(default=True), UpstreamConfig(registry="local", url="http://127.0.0.1:9")),
    )
    with pytest.raises(ConfigError, match="'local' names pushed content"):
        create_app(config)
