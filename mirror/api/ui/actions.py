"""The actions of the web page (routed only with ``--admin-api``; the admin action of the access policy, so with
``--htpasswd`` only users with the admin grant reach them): pin, unpin, evict now, gc dry run, prefetch.

    GET  /ui/actions/                   the actions there are, the pins, the prefetches of this process
    GET  /ui/actions/<action>?image=    the confirmation: what will be done, and a form that does it
    POST /ui/actions/<action>           do it (a form POST), then say what was done
    GET  /ui/jobs/<id>                  a prefetch: its progress (live with static/job.js, else a refresh)
    GET  /ui/jobs/<id>.json             the same as JSON

Each action is ``mirror.admin.Admin``'s, the logic behind ``/admin/v1/*`` and the CLI. A POST must carry the
token of its confirmation form: an HMAC, under a secret of this process, of the user the form was made for, so
another site cannot make a logged-in browser act (it cannot read the form); a POST whose ``Origin`` is another
site is refused as well.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mirror.admin import Admin
from mirror.api.access import ACTOR
from mirror.api.admin import ADMIN
from mirror.api.ui import SETTINGS, missing, page
from mirror.oci.errors import RegistryError
from mirror.oci.reference import format_image_ref
from mirror.routing import image as parse_image

NAMES = ("pin", "unpin", "evict", "gc", "prefetch")
WITH_IMAGE = ("pin", "unpin", "prefetch")
MAX_JOBS = 20  # prefetches remembered (the oldest finished one goes first)


@dataclass
class Job:
    """One prefetch started from the page, and how far it got."""

    id: str
    image: str
    started: float = field(default_factory=time.time)
    done: int = 0
    total: int = 0
    what: str = ""
    state: str = "running"  # running, done, failed
    result: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("id", "image", "done", "total", "what", "state", "result", "error")}


class Jobs:
    """The prefetches of this process: a bounded table, each run as a task that the app's shutdown cancels."""

    def __init__(self) -> None:
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    def start(self, admin: Admin, image: str) -> Job:
        job = Job(str(next(self._ids)), image)
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS:
            oldest = next((k for k, j in self.jobs.items() if j.state != "running"), None)
            if oldest is None:
                break
            del self.jobs[oldest]
        task = asyncio.create_task(self._run(admin, job), name=f"prefetch {image}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, admin: Admin, job: Job) -> None:
        def progress(done: int, total: int, what: str) -> None:
            job.done, job.total, job.what = done, total, what

        try:
            job.result = await admin.prefetch([job.image], progress=progress)
            job.state = "done"
        except RegistryError as exc:
            job.state, job.error = "failed", exc.message
        except Exception as exc:  # an upstream failure the admin logic did not map: shown, not lost in a task
            job.state, job.error = "failed", str(exc) or type(exc).__name__

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        yield
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


JOBS = web.AppKey("ui_jobs", Jobs)
SECRET = web.AppKey("ui_secret", bytes)


def setup(app: web.Application) -> None:
    app[JOBS] = jobs = Jobs()
    app[SECRET] = secrets.token_bytes(32)
    app.cleanup_ctx.append(jobs.lifecycle)


def token(request: web.Request) -> str:
    actor = request.get(ACTOR) or ""
    return hmac.new(request.app[SECRET], f"ui-action:{actor}".encode(), hashlib.sha256).hexdigest()


async def actions(request: web.Request) -> web.Response:
    pins = await request.app[ADMIN].pins()
    jobs = list(reversed(request.app[JOBS].jobs.values()))
    return page("actions.html", request, {"page": "actions", "pins": pins, "jobs": jobs})


def _image(request: web.Request, value: str) -> str:
    """The image of an action, normalized as the admin logic stores it (``docker.io/library/alpine:3.19``)."""
    return format_image_ref(*parse_image(value, request.app[SETTINGS].default_registry))


async def confirm(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in NAMES:
        return await missing(request)
    context: dict[str, Any] = {"page": "actions", "action": action, "token": token(request), "image": ""}
    try:
        if action in WITH_IMAGE:
            context["image"] = _image(request, request.query.get("image", ""))
        if action == "evict":
            context["plan"] = await request.app[ADMIN].evict(dry_run=True)
    except RegistryError as exc:
        return page("done.html", request, {"page": "actions", "action": action, "error": exc.message}, exc.status)
    return page("confirm.html", request, context)


def _same_site(request: web.Request, form: Any) -> bool:
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return False
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    return hmac.compare_digest(str(form.get("token", "")), token(request))


async def act(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in NAMES:
        return await missing(request)
    form = await request.post()
    if not _same_site(request, form):
        context = {"page": "actions", "action": action, "error": "refused: the form did not come from this page"}
        return page("done.html", request, context, status=403)
    admin = request.app[ADMIN]
    try:
        image = _image(request, str(form.get("image", ""))) if action in WITH_IMAGE else ""
        if action == "prefetch":
            job = request.app[JOBS].start(admin, image)
            raise web.HTTPSeeOther(f"/ui/jobs/{job.id}")
        result = await _run(admin, action, image)
    except RegistryError as exc:
        return page("done.html", request, {"page": "actions", "action": action, "error": exc.message}, exc.status)
    return page("done.html", request, {"page": "actions", "action": action, "image": image, "result": result})


async def _run(admin: Admin, action: str, image: str) -> dict[str, Any]:
    if action == "pin":
        return await admin.pin(image)
    if action == "unpin":
        return await admin.unpin(image)
    if action == "evict":
        return await admin.evict(dry_run=False)
    return await admin.gc(dry_run=True)


async def job(request: web.Request) -> web.Response:
    found = request.app[JOBS].jobs.get(request.match_info["id"])
    if found is None:
        return await missing(request)
    return page("job.html", request, {"page": "actions", "job": found})


async def job_json(request: web.Request) -> web.Response:
    found = request.app[JOBS].jobs.get(request.match_info["id"])
    if found is None:
        return await missing(request)
    return web.json_response(found.as_dict(), headers={"Cache-Control": "no-store"})
