"""The one place that renders registry errors and records request metrics."""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from mirror.api.keys import LOCAL, METRICS
from mirror.oci import errors
from mirror.storage.base import StoreUnavailable
from mirror.storage.writer import DiskFull
from mirror.upstream.client import LOOP_HEADER

log = logging.getLogger(__name__)
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")


def error_response(exc: errors.RegistryError) -> web.Response:
    headers = {"Content-Type": "application/json", **exc.headers}
    return web.Response(status=exc.status, text=json.dumps(exc.body()), headers=headers)


def _from_http(exc: web.HTTPException) -> errors.RegistryError:
    if exc.status == 404:
        return errors.NotFound()
    if exc.status == 405:
        return errors.Unsupported("method not allowed on this endpoint")
    if exc.status == 413:
        return errors.SizeInvalid("request body too large")
    return errors.RegistryError(exc.reason or "error", status=exc.status)


@web.middleware
async def registry_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Handlers raise RegistryError (or aiohttp's own 404/405); clients always get registry JSON."""
    try:
        return await handler(request)
    except errors.RegistryError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http(exc))
    except DiskFull as exc:  # the disk filled under any write (the index, the usage table) a handler made
        log.warning("disk full answering %s %s: %s", request.method, request.path, exc)
        return error_response(errors.InsufficientStorage("the mirror's disk is full; nothing was stored"))
    except StoreUnavailable as exc:  # the object store's bucket is down or refuses the mirror
        log.warning("store unavailable answering %s %s: %s", request.method, request.path, exc)
        return error_response(errors.UpstreamUnavailable("the mirror's object store cannot be reached"))
    except (ConnectionError, TimeoutError) as exc:
        log.debug("client connection lost: %s", exc)
        raise
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(errors.RegistryError("internal error; see the mirror's log"))


def refuse_loops(loop_id: str) -> Middleware:
    """A request carrying this mirror's own ``X-Mirror-Fetch`` id was sent by this mirror to an upstream that
    redirected it (or is configured) back here: answer at once, or the fetch would wait on itself. The echoed
    header tells the sending side that it met itself."""

    @web.middleware
    async def refuse(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loop_id and request.headers.get(LOOP_HEADER) == loop_id:
            raise errors.UpstreamBadGateway(
                "this request came from this mirror itself: its upstream led it back here (a loop)",
                status=508,
                headers={LOOP_HEADER: loop_id},
            )
        return await handler(request)

    return refuse


@web.middleware
async def local_names(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With other processes on the data dir: if one of them made a repository local (a first push) since this
    process read the names, read them again before the request is routed (a memory read when nothing changed)."""
    local = request.app[LOCAL]
    if local.stale():
        await local.refresh()
    return await handler(request)


@web.middleware
async def request_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        route = request.match_info.route.name or "other"
        metrics = request.app[METRICS]
        metrics.http_requests.labels(route, request.method, str(status)).inc()
        metrics.http_duration.labels(route, request.method).observe(time.monotonic() - started)


async def add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer, streamed ones included, names the API version."""
    response.headers[API_VERSION[0]] = API_VERSION[1]
