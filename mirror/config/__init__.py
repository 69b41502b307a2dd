"""The mirror's configuration: one frozen value, built from defaults < TOML file < MIRROR_* environment < flags.

Only ``app`` and ``cli`` read it; everything else takes plain arguments.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_LISTEN = "0.0.0.0:5000"
DEFAULT_DATA_DIR = "./mirror-data"
DOCKER_HUB_URL = "https://registry-1.docker.io"
# Five minutes: long enough that a CI burst pulling the same tag asks the upstream once, short enough that a
# re-pushed tag is seen soon. 0 revalidates on every request (one HEAD, which Docker Hub does not count).
DEFAULT_TAG_TTL = 300.0
DEFAULT_MAX_BLOB_SIZE = 16 << 30
# ``[[upstreams]] registry = "*"``: any registry host matching its ``allow_hosts`` patterns (off unless configured).
WILDCARD = "*"


class ConfigError(Exception):
    """A setting is missing, malformed or contradictory; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    registry: str = "docker.io"  # the name clients use for it
    url: str = DOCKER_HUB_URL
    default: bool = False
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    token: str | None = None  # a static Bearer token sent instead of the token handshake
    token_file: str | None = None
    tag_ttl: float = DEFAULT_TAG_TTL
    max_stale: float = 0.0  # seconds a tag may be served stale when the upstream is down; 0 = no limit
    timeout: float = 10.0  # seconds to wait for the upstream before answering stale (or failing)
    allow: tuple[str, ...] = ()  # repository patterns served from this upstream (fnmatch); () = all
    deny: tuple[str, ...] = ()  # repository patterns refused with DENIED, checked before ``allow``
    max_connections: int = 0  # open connections to the upstream's host at once; 0 = no limit
    ratelimit_threshold: int = 10  # below this many pulls left (ratelimit-remaining), stop revalidating tags...
    ratelimit_pause: float = 600.0  # ...for this many seconds (after a 429: Retry-After, or this)
    allow_hosts: tuple[str, ...] = ()  # only for registry = "*": the registry hosts the wildcard may reach
    min_rate: float = 4096.0  # bytes/s a blob download must average over each rate_window, or it is cut...
    rate_window: float = 30.0  # ...seconds (0 for either: no floor)

    @property
    def wildcard(self) -> bool:
        return self.registry == WILDCARD

    def secret(self) -> str | None:
        return self._read(self.password_file, "password") if self.password_file else self.password

    def bearer(self) -> str | None:
        return self._read(self.token_file, "token") if self.token_file else self.token

    def _read(self, path: str, what: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the {what} file for {self.registry}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class NotificationsConfig:
    """The ``[notifications]`` table (and ``--notify-url``): webhooks for manifest pushes and deletes."""

    urls: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)  # sent with every event (e.g. Authorization)
    timeout: float = 5.0
    attempts: int = 5
    backoff: float = 1.0  # seconds before the first retry, doubling


@dataclass(frozen=True, slots=True)
class Config:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(default=True),)
    log_level: str = "info"
    log_format: str = "text"
    uvloop: bool = False
    cache_size: int = 0  # bytes of pulled-through content to keep; 0 = no limit (see CacheConfig)
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE  # larger blobs are refused (announced) or cut (unannounced)
    admin_api: bool = False  # serve the JSON admin API under /admin/v1/
    ui: bool = True  # serve the web page under /ui/ (and redirect / there)
    workers: int = 1  # serving processes on one port and one data dir (``mirror.workers``); 1: this process
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections other modules own (push, cache, ...)
    # Local pushes, access control, TLS and webhooks (README "Pushing images").
    htpasswd: Path | None = None  # bcrypt htpasswd file: Basic auth on; None: auth off
    anonymous_pull: bool = True  # with htpasswd: clients without credentials may pull
    anonymous_push: str = "loopback"  # without htpasswd: who may push/delete: loopback, any, off
    read_only: bool = False
    push_prefixes: tuple[str, ...] = ()  # names that accept pushes; () = all but library/ and cached names
    upload_max_age: float = 86400.0  # seconds an idle upload session is kept
    upload_max_sessions: int = 1024  # upload sessions open at once, in all (past it: 429 TOOMANYREQUESTS)
    upload_max_sessions_per_client: int = 64  # ...and per client address
    upload_idle_when_full: float = 300.0  # over the cache's high watermark, sessions idle this long are removed
    tls_cert: Path | None = None
    tls_key: Path | None = None
    notifications: NotificationsConfig = field(default_factory=lambda: NotificationsConfig())
    # Internal (set by ``mirror.workers``, no flag): "process" when this process is alone on the data dir; "files"
    # when several serving processes share it (fetches coordinated through lock files, ``pull.filelock``).
    coordination: str = "process"

    @property
    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--listen must be HOST:PORT, got {self.listen!r}")
        return host.strip("[]") or "0.0.0.0", int(port)

    @property
    def default_upstream(self) -> UpstreamConfig:
        return next(u for u in self.upstreams if u.default)


# Flat settings: flag / environment / top-level TOML key -> how to apply it.
UPSTREAM_KEYS = {
    "upstream": "url",
    "upstream_username": "username",
    "upstream_password": "password",
    "upstream_password_file": "password_file",
    "tag_ttl": "tag_ttl",
    "max_stale": "max_stale",
    "upstream_timeout": "timeout",
}
TOP_KEYS = {"add_upstream", "listen", "data_dir", "log_level", "log_format", "uvloop", "cache_size", "admin_api", "ui"}
TOP_KEYS |= {"max_blob_size", "workers"}
MAX_WORKERS = 256
# Local pushes and access (strings from flags/environment are converted in _push_settings).
PUSH_KEYS = {
    "htpasswd",
    "anonymous_pull",
    "anonymous_push",
    "read_only",
    "push_prefixes",
    "upload_max_age",
    "upload_max_sessions",
    "upload_max_sessions_per_client",
    "upload_idle_when_full",
    "tls_cert",
    "tls_key",
    "notify_urls",
}
TOP_KEYS |= PUSH_KEYS
ANONYMOUS_PUSH = ("loopback", "any", "off")
# Tables of the config file besides [[upstreams]] (a misspelt one must not be silently ignored).
TABLES = {"cache", "cluster", "notifications", "storage"}
FLOAT_KEYS = {"tag_ttl", "max_stale", "upstream_timeout"}


def env_settings(environ: Mapping[str, str], known: set[str]) -> dict[str, str]:
    """``MIRROR_TAG_TTL=60`` -> ``{"tag_ttl": "60"}`` for every known key."""
    return {k: environ[f"MIRROR_{k.upper()}"] for k in known if f"MIRROR_{k.upper()}" in environ}


def read_toml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _upstream_from_table(table: Mapping[str, Any]) -> UpstreamConfig:
    names = {f.name for f in fields(UpstreamConfig)}
    unknown = set(table) - names
    if unknown:
        raise ConfigError(f"unknown keys in [[upstreams]]: {', '.join(sorted(unknown))}")
    if "registry" not in table or ("url" not in table and table.get("registry") != WILDCARD):
        raise ConfigError("every [[upstreams]] entry needs registry and url")
    if table.get("registry") == WILDCARD:
        table = {"url": "https://{registry}", **table}
    values = dict(table)
    for key in ("tag_ttl", "max_stale", "timeout", "ratelimit_pause", "min_rate", "rate_window"):
        if key in values:
            values[key] = float(values[key])
    for key in ("max_connections", "ratelimit_threshold"):
        if key in values:
            values[key] = int(values[key])
    for key in ("allow", "deny", "allow_hosts"):
        if key in values:
            if not isinstance(values[key], list) or not all(isinstance(v, str) for v in values[key]):
                raise ConfigError(f"[[upstreams]] {key} must be a list of strings")
            values[key] = tuple(values[key])
    upstream = UpstreamConfig(**values)
    if upstream.wildcard:
        if not upstream.allow_hosts:
            raise ConfigError('the wildcard upstream (registry = "*") needs allow_hosts, the hosts it may reach')
        if upstream.default or upstream.username or upstream.token or upstream.token_file:
            raise ConfigError('the wildcard upstream (registry = "*") cannot be the default nor carry credentials')
        if "{registry}" not in upstream.url:
            raise ConfigError('the wildcard upstream\'s url must contain {registry}, e.g. "https://{registry}"')
    elif upstream.allow_hosts:
        raise ConfigError(f"allow_hosts is only for the wildcard upstream, not {upstream.registry}")
    return upstream


def _upstream_from_flag(item: str) -> UpstreamConfig:
    """``--add-upstream ghcr.io=https://ghcr.io``: another upstream with default settings."""
    registry, sep, url = item.partition("=")
    if not sep or not registry.strip() or not url.strip().startswith(("http://", "https://")):
        raise ConfigError(f"--add-upstream takes REGISTRY=URL, e.g. ghcr.io=https://ghcr.io; got {item!r}")
    return UpstreamConfig(registry=registry.strip(), url=url.strip())


def build(flat: Mapping[str, Any], upstream_tables: list[Mapping[str, Any]] | None, extra: Mapping[str, Any]) -> Config:
    """Assemble a Config from already-merged flat settings and optional ``[[upstreams]]`` tables."""
    try:
        upstreams = [_upstream_from_table(t) for t in upstream_tables] if upstream_tables else [UpstreamConfig()]
        upstreams += [_upstream_from_flag(item) for item in _names(flat.get("add_upstream") or ())]
        if not any(u.default for u in upstreams):
            first = next((i for i, u in enumerate(upstreams) if not u.wildcard), None)
            if first is None:
                raise ConfigError('the wildcard upstream (registry = "*") needs a named default upstream beside it')
            upstreams[first] = replace(upstreams[first], default=True)
        if sum(u.default for u in upstreams) > 1:
            raise ConfigError("only one upstream may have default = true")
        overrides: dict[str, Any] = {
            UPSTREAM_KEYS[k]: (float(v) if k in FLOAT_KEYS else v) for k, v in flat.items() if k in UPSTREAM_KEYS
        }
        upstreams = [replace(u, **overrides) if u.default else u for u in upstreams]
        registries = [u.registry for u in upstreams]
        if len(set(registries)) != len(registries):
            raise ConfigError("two [[upstreams]] entries name the same registry")
        top = {k: v for k, v in flat.items() if k in TOP_KEYS and k != "add_upstream"}
        if "data_dir" in top:
            top["data_dir"] = Path(top["data_dir"])
        for flag in ("uvloop", "admin_api", "ui"):
            if flag in top:
                top[flag] = _truthy(top[flag])
        top.update(_push_settings(top, extra.get("notifications")))
        top.pop("notify_urls", None)  # merged into notifications
        if "cache_size" in top:
            top["cache_size"] = parse_size(top["cache_size"])
        if "max_blob_size" in top:
            top["max_blob_size"] = parse_size(top["max_blob_size"])
        if "workers" in top:
            top["workers"] = parse_workers(top["workers"])
        config = Config(upstreams=tuple(upstreams), extra=dict(extra), **top)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc
    if config.log_format not in ("text", "json"):
        raise ConfigError("--log-format must be text or json")
    config.host_port  # noqa: B018 - validates --listen
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if config.max_blob_size <= 0:
        raise ConfigError("max_blob_size must be a positive size, e.g. 16GiB")
    if config.anonymous_push not in ANONYMOUS_PUSH:
        raise ConfigError(f"--anonymous-push must be one of {', '.join(ANONYMOUS_PUSH)}")
    from mirror.config.access import access_rules  # here, not at the top: these modules build on this one
    from mirror.config.cache import cache_config
    from mirror.config.cluster import cluster_config
    from mirror.config.storage import storage_config

    cache_config(config)  # validates the [cache] table
    access_rules(config)  # validates the [[access]] tables
    storage_config(config)  # validates the [storage] table
    cluster_config(config)  # validates the [cluster] table
    return config


def parse_workers(value: object) -> int:
    """``--workers``: a count from 1 to MAX_WORKERS, or ``auto``: one per core this process may run on."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        count = int(str(value).strip()) if not isinstance(value, bool) else 0
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(f"workers must be a number from 1 to {MAX_WORKERS}, or auto; got {value!r}")
    return count


def _truthy(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _names(value: Any) -> tuple[str, ...]:
    """A list from TOML or repeated flags, or a comma-separated string from the environment."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


def _push_settings(top: Mapping[str, Any], table: Any) -> dict[str, Any]:
    """Typed values of the push/access keys present in ``top``, and the ``[notifications]`` table."""
    out: dict[str, Any] = {}
    for key in ("htpasswd", "tls_cert", "tls_key"):
        if top.get(key):
            out[key] = Path(top[key])
    for key in ("anonymous_pull", "read_only"):
        if key in top:
            out[key] = _truthy(top[key])
    if "push_prefixes" in top:
        out["push_prefixes"] = _names(top["push_prefixes"])
    for key in ("upload_max_age", "upload_idle_when_full"):
        if key in top:
            out[key] = float(top[key])
    for key in ("upload_max_sessions", "upload_max_sessions_per_client"):
        if key in top:
            out[key] = int(top[key])
            if out[key] < 1:
                raise ConfigError(f"{key} must be at least 1")
    table = dict(table or {})
    unknown = set(table) - {"urls", "headers", "timeout", "attempts", "backoff"}
    if unknown:
        raise ConfigError(f"unknown keys in [notifications]: {', '.join(sorted(unknown))}")
    urls = _names(table.get("urls", ())) + _names(top.get("notify_urls") or ())
    headers = table.get("headers", {})
    if not isinstance(headers, dict):
        raise ConfigError("[notifications] headers must be a table of header = value")
    out["notifications"] = NotificationsConfig(
        urls=urls,
        headers={str(k): str(v) for k, v in headers.items()},
        timeout=float(table.get("timeout", 5.0)),
        attempts=max(1, int(table.get("attempts", 5))),
        backoff=float(table.get("backoff", 1.0)),
    )
    return out


def load(cli_values: Mapping[str, Any], config_path: str | None, environ: Mapping[str, str] = os.environ) -> Config:
    known = TOP_KEYS | set(UPSTREAM_KEYS)
    document = read_toml(config_path or environ.get("MIRROR_CONFIG"))
    upstream_tables = document.pop("upstreams", None)
    access_tables = document.pop("access", None)  # [[access]]: an array of tables, kept in extra (access_rules)
    file_flat = {k.replace("-", "_"): v for k, v in document.items() if not isinstance(v, dict)}
    unknown = set(file_flat) - known
    if unknown:
        raise ConfigError(f"unknown settings in config file: {', '.join(sorted(unknown))}")
    extra = {k: v for k, v in document.items() if isinstance(v, dict)}
    unknown = set(extra) - TABLES
    if unknown:
        raise ConfigError(
            f"unknown tables in config file: {', '.join(f'[{t}]' for t in sorted(unknown))} "
            f"(known: {', '.join(f'[{t}]' for t in sorted(TABLES))}, [[upstreams]], [[access]])"
        )
    if access_tables is not None:
        extra["access"] = access_tables
    from mirror.config.cluster import with_environment  # here: it builds on this module

    extra = with_environment(extra, environ)  # MIRROR_CLUSTER_ADVERTISE and the rest, over the file's [cluster]
    merged = {**file_flat, **env_settings(environ, known), **{k: v for k, v in cli_values.items() if v is not None}}
    return build(merged, upstream_tables, extra)


# --- sizes (--cache-size, max_blob_size, [cache], [storage] local_cache) -----------------------------------------
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: object) -> int:
    """Bytes from ``50GiB`` (powers of 1024), ``50GB`` or ``50G`` (powers of 1000), or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"a size cannot be negative: {value}")
        return value
    match = _SIZE_RE.fullmatch(str(value))
    if match is None or (match.group(3) and not match.group(2)):
        raise ConfigError(f"not a size: {value!r} (use bytes or units like 500MiB, 50GiB, 2TB)")
    number, prefix, binary, _ = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** _SIZE_POWERS[prefix.lower()])
