"""The web page under ``/ui/`` (off with ``--ui off``): rendered on the server with Jinja2 (autoescape on, so a
name from the URL shows as text), no external assets (the CSS is inline in ``templates/base.html``), readable
without JavaScript.

    GET /           303 to /ui/
    GET /ui/        the overview: hit ratios, bytes saved, cache fill and watermarks, upstream health, and
                    registry requests per minute over the last hour
    GET /ui/inflight.json   the blob fetches under way (what the overview's live part polls)
    GET /ui/live.js the page's one script: it polls inflight.json once a second and redraws the progress bars
    GET /ui/...     any other page: a 404 page (HTML)

The overview's figures are the admin commands' (``Admin.stats``, the same dict ``/admin/v1/stats`` answers) and
the upstream counters of ``mirror.metrics``; each figure carries its raw value in ``data-value`` beside the
human form, so a test (or a script) reads exactly what is shown.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from mirror.api.admin import ADMIN
from mirror.api.keys import METRICS, PULL

CHART_WIDTH, CHART_HEIGHT = 600, 120  # the SVG's viewBox; it scales to the page's width
# Nothing but the mirror itself: the browser refuses any other origin, and scripts other than the mirror's files.
POLICY = "default-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
MAX_SHOWN = 100  # fetches listed at most (a herd of cold pulls does not make a page of megabytes)
SCRIPT = web.AppKey("ui_script", bytes)


def setup(app: web.Application) -> None:
    """Jinja2 over the package's templates (shipped as package data), escaping every value."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("mirror.api", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters={"size": human_size, "percent": percent},
    )
    app[SCRIPT] = resources.files("mirror.api").joinpath("static/live.js").read_bytes()  # once, at start-up


async def root(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/ui/")


async def overview(request: web.Request) -> web.Response:
    stats = await request.app[ADMIN].stats()
    metrics = request.app[METRICS]
    context = {
        "page": "overview",
        "stats": stats,
        "fill": fill(stats),
        "upstreams": await asyncio.to_thread(metrics.upstream_summary),  # reads files with several processes
        "chart": chart(metrics.per_minute.last(time.monotonic())),
        "inflight": in_flight(request),
    }
    return page("overview.html", request, context)


async def inflight_json(request: web.Request) -> web.Response:
    return web.json_response({"fetches": in_flight(request)}, headers={"Cache-Control": "no-store"})


async def script(request: web.Request) -> web.Response:
    return web.Response(body=request.app[SCRIPT], content_type="text/javascript", headers={"Cache-Control": "no-cache"})


def in_flight(request: web.Request) -> list[dict[str, Any]]:
    """The blob fetches under way in this process: repository, size, bytes so far, average speed, clients."""
    now = time.monotonic()
    rows = []
    for registry, fetch in request.app[PULL].inflight.under_way():
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
    rows.sort(key=lambda row: (row["repo"], row["digest"]))
    return rows[:MAX_SHOWN]


async def missing(request: web.Request) -> web.Response:
    """Unknown pages: an HTML 404 that names the path asked for (escaped like everything else)."""
    return page("missing.html", request, {"page": "", "path": request.path}, status=404)


def page(template: str, request: web.Request, context: dict[str, Any], status: int = 200) -> web.Response:
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


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


def human_size(value: float | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"
