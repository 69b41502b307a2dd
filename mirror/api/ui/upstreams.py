"""The upstreams page (``GET /ui/upstreams``): each configured upstream with its URL, how names reach it (the
``?ns=`` parameter, a host prefix in the path, bare names for the default one), its health (last answer and last
failure, from ``UpstreamClient.health``), its pull quota and the tags served without revalidation to save that
quota (``mirror_ratelimit_deferred``). Wildcard hosts in use have a row each below their entry."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from mirror.api.keys import CLIENTS, METRICS
from mirror.api.ui import SETTINGS, Settings, page


def routing(registry: str, default: bool) -> list[str]:
    """How a client names this upstream's images on the mirror (``routing.route``'s three dialects)."""
    ways = [f"?ns={registry} (containerd hosts.toml)", f"{registry}/<path> (a host prefix: podman, override_path)"]
    if default:
        ways.insert(0, "<path> (bare names: Docker's registry-mirrors)")
    return ways


async def upstreams(request: web.Request) -> web.Response:
    settings, clients = request.app[SETTINGS], request.app[CLIENTS]
    metrics = request.app[METRICS]  # both read files with several processes: in a thread
    summary = await asyncio.to_thread(metrics.upstream_summary)
    deferred = await asyncio.to_thread(metrics.deferred_summary)
    rows: list[dict[str, Any]] = []
    for route in settings.upstreams:
        names = [route.registry] if route.registry != "*" else sorted(r for r in clients if r not in _named(settings))
        if route.registry == "*":
            rows.append({"registry": "*", "url": route.url, "wildcard": route.allow_hosts, "health": None})
        for name in names:
            client = clients.get(name)
            figures = summary.get(name, {})
            rows.append(
                {
                    "registry": name,
                    "url": client.settings.url if client else route.url,
                    "default": route.default,
                    "wildcard": (),
                    "routing": routing(name, route.default),
                    "health": client.health if client else None,
                    "saving": client.quota.saving() if client else None,
                    "pulls_left": figures.get("pulls_left"),
                    "pull_limit": figures.get("pull_limit"),
                    "deferred": deferred.get(name, {}),
                    "errors": figures.get("errors", 0.0),
                    "rate_limited": figures.get("rate_limited", 0.0),
                }
            )
    return page("upstreams.html", request, {"page": "upstreams", "upstreams": rows})


def _named(settings: Settings) -> set[str]:
    return {u.registry for u in settings.upstreams if u.registry != "*"}
