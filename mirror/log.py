"""Logging: readable text lines by default, one JSON object per line with ``--log-format json``.

Requests aiohttp's HTTP parser rejects (garbage on the socket, oversized or malformed lines) are logged by
``aiohttp.server`` as an ERROR with a traceback each; ``quiet_parser_errors`` turns them into one INFO line, at
most one a second, with how many were left out since the last, so that nobody can flood the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, pid: bool = False):
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.pid:
            entry["pid"] = record.process
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str, fmt: str, pid: bool = False) -> None:
    """Log to stderr at ``level`` as ``fmt`` (text or json); ``pid``: each line names its process (with
    ``--workers``, which worker wrote it)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(pid))
    else:
        process = "[%(process)d] " if pid else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {process}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class ParserErrors(logging.Filter):
    """On ``aiohttp.server``: a parser rejection becomes one INFO line, at most one per ``interval`` seconds (by
    the records' own times); the others are counted and the count goes into the next line. Anything else (a
    handler's unexpected exception) passes unchanged."""

    def __init__(self, interval: float = 1.0):
        super().__init__()
        self.interval = interval
        self._last = float("-inf")
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if record.created - self._last < self.interval:
            self._suppressed += 1
            return False
        self._last = record.created
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        reason = " ".join(f"{exc.code} {exc.message}".split())[:200]  # the message quotes the bytes, newlines too
        suppressed = f" ({self._suppressed} more since the last line)" if self._suppressed else ""
        self._suppressed = 0
        record.msg = "rejected a malformed request from %s: %s%s"
        record.args = (remote, reason, suppressed)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def quiet_parser_errors() -> None:
    """Install ``ParserErrors`` on ``aiohttp.server`` (once, however often it is called)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ParserErrors) for f in logger.filters):
        logger.addFilter(ParserErrors())
