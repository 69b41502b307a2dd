"""The access log: one line per request, with the fields attached so ``--log-format json`` carries them as keys."""

from __future__ import annotations

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse


class AccessLogger(AbstractAccessLogger):
    """One line per request; the fields are also attached to the record, so JSON logs carry them as keys."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        fields = {
            "remote": request.remote,
            "method": request.method,
            "path": request.path_qs,
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
            "user_agent": request.headers.get("User-Agent", ""),
        }
        self.logger.info(
            '%s "%s %s" %s %s %.1fms',
            fields["remote"],
            fields["method"],
            fields["path"],
            fields["status"],
            fields["bytes"],
            fields["duration_ms"],
            extra=fields,
        )
