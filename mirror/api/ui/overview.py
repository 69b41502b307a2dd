"""The overview (``GET /ui/``): hit ratios, bytes saved, cache fill and watermarks, upstream health, and registry
requests per minute over the last hour; and the blob fetches in flight (``GET /ui/inflight.json``, what
``static/live.js`` polls once a second).

The figures are the admin commands' (``Admin.stats``, the same dict ``/admin/v1/stats`` answers) and the upstream
counters of ``mirror.metrics``; each figure carries its raw value in ``data-value`` beside the human form, so a
test (or a script) reads exactly what is shown.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from mirror.api.admin import ADMIN
from mirror.api.keys import METRICS, PULL
from mirror.api.ui import page

CHART_WIDTH, CHART_HEIGHT = 600, 120  # the SVG's viewBox; it scales to the page's width
MAX_SHOWN = 100  # fetches listed at most (a herd of cold pulls does not make a page of megabytes)


async def overview(request: web.Request) -> web.Response:
    stats = await request.app[ADMIN].stats(fresh=False)  # the same figures, without a walk of the tables
    metrics = request.app[METRICS]
    totals = await asyncio.to_thread(metrics.totals)  # reads files with several processes
    minute = int(time.time() // 60)
    metrics.timeline.add(minute, totals)
    bytes_cache = metrics.timeline.per_minute("bytes_cache", minute, totals)
    bytes_upstream = metrics.timeline.per_minute("bytes_upstream", minute, totals)
    context = {
        "page": "overview",
        "stats": stats,
        "hour": hit_ratios(metrics.timeline.last_hour(minute, totals)),
        "fill": fill(stats),
        "upstreams": await asyncio.to_thread(metrics.upstream_summary),
        "chart": chart([int(n) for n in metrics.timeline.per_minute("requests", minute, totals)]),
        "bytes": byte_chart(bytes_cache, bytes_upstream),
        "inflight": await in_flight(request),
    }
    return page("overview.html", request, context)


async def inflight_json(request: web.Request) -> web.Response:
    return web.json_response({"fetches": await in_flight(request)}, headers={"Cache-Control": "no-store"})


async def in_flight(request: web.Request) -> list[dict[str, Any]]:
    """The blob fetches under way: repository, size, bytes so far, average speed, clients. This process's, and
    (with ``--workers``) the other workers' from their lock files, whose clients it cannot count (None)."""
    inflight = request.app[PULL].inflight
    now = time.monotonic()
    rows: list[dict[str, Any]] = []
    for registry, fetch in inflight.under_way():
        elapsed = max(now - fetch.started_at, 1e-3)
        rows.append(
            {
                "digest": str(fetch.digest),
                "upstream": registry,
                "repo": fetch.repo,
                "size": fetch.size,
                "written": fetch.written,
                "speed": round(fetch.written / elapsed),
                "clients": fetch.clients,
            }
        )
    wall = time.time()
    for other in await inflight.elsewhere():
        elapsed = max(wall - other.started, 1e-3)
        rows.append(
            {
                "digest": str(other.digest),
                "upstream": other.registry,
                "repo": other.repo,
                "size": other.size,
                "written": other.written,
                "speed": round(other.written / elapsed),
                "clients": None,
            }
        )
    rows.sort(key=lambda row: (row["repo"], row["digest"]))
    return rows[:MAX_SHOWN]


def fill(stats: dict[str, Any]) -> dict[str, float] | None:
    """Cache fill and the eviction watermarks as percentages of ``--cache-size``; None without a limit."""
    limit = stats["limit_bytes"]
    if not limit:
        return None
    return {
        "size": min(100.0, 100.0 * stats["size_bytes"] / limit),
        "high": 100.0 * stats["high_watermark_bytes"] / limit,
        "low": 100.0 * stats["low_watermark_bytes"] / limit,
    }


def hit_ratios(growth: dict[str, float]) -> dict[str, float | None]:
    """Hit ratio by kind over the last hour, as ``Admin.stats`` computes it since start: hits / (hits + misses)."""
    out: dict[str, float | None] = {}
    for kind in ("blob", "manifest", "tag"):
        hits, misses = growth.get(f"{kind}_hit", 0.0), growth.get(f"{kind}_miss", 0.0)
        out[kind] = round(hits / (hits + misses), 4) if hits + misses else None
    return out


def byte_chart(cache: list[float], upstream: list[float]) -> dict[str, Any]:
    """Stacked bars for an inline SVG: bytes served per minute from the cache (below) and fetched upstream."""
    peak = max((c + u for c, u in zip(cache, upstream, strict=True)), default=0.0) or 1.0
    slot = CHART_WIDTH / len(cache)
    bars = []
    for i, (c, u) in enumerate(zip(cache, upstream, strict=True)):
        low, high = CHART_HEIGHT * c / peak, CHART_HEIGHT * u / peak
        bars.append(
            {
                "x": round(i * slot, 2),
                "cache": {"y": round(CHART_HEIGHT - low, 2), "h": round(low, 2)},
                "upstream": {"y": round(CHART_HEIGHT - low - high, 2), "h": round(high, 2)},
            }
        )
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bar": round(slot * 0.8, 2),
        "bars": bars,
        "cache": [int(n) for n in cache],
        "upstream": [int(n) for n in upstream],
        "total_cache": int(sum(cache)),
        "total_upstream": int(sum(upstream)),
    }


def chart(counts: list[int]) -> dict[str, Any]:
    """Bars for an inline SVG: one per minute, oldest first, scaled to the busiest minute."""
    peak = max(counts) or 1
    slot = CHART_WIDTH / len(counts)
    bars = []
    for i, count in enumerate(counts):
        height = CHART_HEIGHT * count / peak
        bars.append({"x": round(i * slot, 2), "y": round(CHART_HEIGHT - height, 2), "h": round(height, 2)})
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bar": round(slot * 0.8, 2),
        "bars": bars,
        "counts": counts,
        "peak": max(counts),
        "total": sum(counts),
    }
