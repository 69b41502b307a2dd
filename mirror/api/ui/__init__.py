"""The web page under ``/ui/`` (off with ``--ui off``): rendered on the server with Jinja2 (autoescape on, so a
name from the URL shows as text), no external assets (the CSS is inline in ``templates/base.html``, scripts are
the mirror's own files), readable without JavaScript.

    GET /                       303 to /ui/
    GET /ui/                    the overview (``ui.overview``)
    GET /ui/inflight.json       the blob fetches under way (what the overview's live part polls)
    GET /ui/repositories        pulled-through and pushed repositories, searchable (``?q=``), a page at a time
    GET /ui/repositories/<registry>/<path>   one repository: tags, digests, platforms, sizes, pull commands
    GET /ui/images/<registry>/<path>?digest= one image: its manifest tree, layers, referrers
    GET /ui/upstreams           each upstream: URL, routing, health, quota, tags held back
    GET /ui/static/<file>       the page's scripts (live.js, copy.js, job.js)
    GET /ui/login?next=         asks for credentials, then back to the page (so it offers that user's actions)
    /ui/actions/...             pin, unpin, evict, gc dry run, prefetch (``ui.actions``; only with --admin-api)
    GET /ui/...                 any other page: a 404 page (HTML)

Every page takes the pull action of the access policy (the actions the admin action), so ``--htpasswd
--no-anonymous-pull`` asks for credentials. This module holds what every page shares: the set-up, the response
headers and the filters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from mirror.api.access import ACTOR
from mirror.api.keys import ACCESS, METRICS
from mirror.permissions import Action

# Nothing but the mirror itself: the browser refuses any other origin, and scripts other than the mirror's files.
POLICY = "default-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
SCRIPTS = ("live.js", "copy.js", "job.js")


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    """A configured upstream as the upstreams page shows it (the composition root reads the config)."""

    registry: str  # "docker.io", or "*" for the wildcard entry
    url: str
    default: bool = False
    allow_hosts: tuple[str, ...] = ()  # the wildcard entry's host patterns


@dataclass(frozen=True, slots=True)
class Settings:
    actions: bool = False  # --admin-api: the action pages are routed
    default_registry: str = "docker.io"
    upstreams: tuple[UpstreamRoute, ...] = ()


SETTINGS = web.AppKey("ui_settings", Settings)
STATIC: web.AppKey[Mapping[str, bytes]] = web.AppKey("ui_static")


def setup(app: web.Application, settings: Settings) -> None:
    """Jinja2 over the package's templates (shipped as package data), escaping every value."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("mirror.api", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters={"size": human_size, "percent": percent, "ago": ago},
    )
    files = resources.files("mirror.api").joinpath("static")
    app[STATIC] = {name: files.joinpath(name).read_bytes() for name in SCRIPTS}  # once, at start-up
    app[SETTINGS] = settings
    app.cleanup_ctx.append(sample_timeline)


SAMPLE_EVERY = 20.0  # seconds between samples of the counters: at least one lands in every minute


async def sample_timeline(app: web.Application) -> AsyncIterator[None]:
    """The overview's last hour: the counters' totals sampled in the background (in a thread: with several
    processes they are read from files), whether or not anybody looks at the page."""
    metrics = app[METRICS]

    async def sample_forever() -> None:
        while True:
            with contextlib.suppress(OSError):  # a process's metrics file going away mid-read: next time
                metrics.timeline.add(int(time.time() // 60), await asyncio.to_thread(metrics.totals))
            await asyncio.sleep(SAMPLE_EVERY)

    task = asyncio.create_task(sample_forever(), name="web page timeline")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def root(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/ui/")


async def login(request: web.Request) -> web.Response:
    """``GET /ui/login?next=/ui/...``: the access check asks for credentials (the ping action: any user), and the
    browser then sends them with every page under ``/ui/`` (its protection space is the directory of the URL that
    asked), so the pages offer this user's actions. Then back to ``next``, a path on this site only."""
    target = request.query.get("next", "/ui/")
    if not target.startswith("/ui/") or "//" in target or "\\" in target:
        target = "/ui/"
    raise web.HTTPSeeOther(target)


async def script(request: web.Request) -> web.Response:
    body = request.app[STATIC].get(request.match_info.get("file", "live.js"))
    if body is None:
        return await missing(request)
    return web.Response(body=body, content_type="text/javascript", headers={"Cache-Control": "no-cache"})


async def missing(request: web.Request) -> web.Response:
    """Unknown pages: an HTML 404 that names the path asked for (escaped like everything else)."""
    return page("missing.html", request, {"page": "", "path": request.path}, status=404)


def may_act(request: web.Request) -> bool:
    """Whether the page offers this caller the actions: routed (--admin-api) and allowed (the admin grant)."""
    if not request.app[SETTINGS].actions:
        return False
    return request.app[ACCESS].may(request.get(ACTOR), Action.ADMIN, "")


def page(template: str, request: web.Request, context: dict[str, Any], status: int = 200) -> web.Response:
    """Render ``template``; ``routed`` (the actions exist: the menu links them, so a user can log in there) and
    ``actions`` (this caller may use them: the buttons) are in every page's context."""
    context["routed"] = request.app[SETTINGS].actions
    context["actions"] = may_act(request)
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


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


def ago(value: float | None) -> str:
    """A wall-clock time as how long ago it was: "never", "12 s ago", "3 min ago", "5 h ago", "2 d ago"."""
    if not value:
        return "never"
    seconds = max(0.0, time.time() - value)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"
