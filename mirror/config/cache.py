"""The ``[cache]`` table of the config file: how the store is kept within its bounds (watermarks, pins, how often
last-served times are written, gc's grace), read into a plain value beside ``--cache-size``."""

from __future__ import annotations

from dataclasses import dataclass, fields

from mirror.config import Config, ConfigError


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """How the store is kept within bounds. ``size`` comes from ``--cache-size``; the rest from ``[cache]``."""

    size: int = 0  # 0: no limit
    high_watermark: float = 0.95  # eviction starts when the cache passes this fraction of ``size``...
    low_watermark: float = 0.85  # ...and stops once it is back under this one
    pins: tuple[str, ...] = ()  # images never evicted (besides those pinned with ``mirror pin``)
    flush_interval: float = 10.0  # seconds between writes of batched last-served times to the index
    gc_grace: float = 3600.0  # gc keeps unreferenced content served or stored within this many seconds
    tmp_max_age: float = 3600.0  # gc while serving removes temp files untouched for this long
    top_repos: int = 20  # repositories with their own label in per-repository metrics
    repo_allowlist: tuple[str, ...] = ()  # repositories that always get their own label


def cache_config(config: Config) -> CacheConfig:
    table = dict(config.extra.get("cache", {}))
    names = {f.name for f in fields(CacheConfig)} - {"size"}
    unknown = set(table) - names
    if unknown:
        raise ConfigError(f"unknown keys in [cache]: {', '.join(sorted(unknown))}")
    try:
        for key in ("pins", "repo_allowlist"):
            if key in table:
                if not isinstance(table[key], list) or not all(isinstance(v, str) for v in table[key]):
                    raise ConfigError(f"[cache] {key} must be a list of strings")
                table[key] = tuple(table[key])
        for key in ("high_watermark", "low_watermark", "flush_interval", "gc_grace", "tmp_max_age"):
            if key in table:
                table[key] = float(table[key])
        if "top_repos" in table:
            table["top_repos"] = int(table["top_repos"])
        cache = CacheConfig(size=config.cache_size, **table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid [cache] setting: {exc}") from exc
    if not 0 < cache.low_watermark <= cache.high_watermark <= 1:
        raise ConfigError("[cache] needs 0 < low_watermark <= high_watermark <= 1")
    if cache.flush_interval <= 0:
        raise ConfigError("[cache] flush_interval must be positive")
    return cache
