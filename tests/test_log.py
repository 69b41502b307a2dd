"""``--log-format json`` gives one parseable object per line, with the access log's fields as keys."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from pytest_aiohttp import AiohttpClient

from mirror import log
from mirror.app import create_app
from mirror.config import Config, UpstreamConfig


def test_json_lines_carry_fields(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("info", "json")
    try:
        logging.getLogger("aiohttp.access").info("GET /v2/ 200", extra={"status": 200, "path": "/v2/"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("mirror.test").exception("failed")
        lines = capsys.readouterr().err.strip().splitlines()
        first, second = (json.loads(line) for line in lines)
        assert first["message"] == "GET /v2/ 200" and first["status"] == 200 and first["path"] == "/v2/"
        assert first["level"] == "info" and first["time"].endswith("Z")
        assert second["level"] == "error" and "ValueError: boom" in second["exception"]
    finally:
        log.setup("warning", "text")


def test_text_format_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("info", "text")
    try:
        logging.getLogger("mirror.test").info("cached blob %s", "sha256:ab")
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "INFO" in line and "mirror.test: cached blob sha256:ab" in line
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    finally:
        log.setup("warning", "text")


async def test_malformed_requests_log_one_line_at_info_not_a_traceback(
    aiohttp_client: AiohttpClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Garbage on the socket, many times over: aiohttp answers 400 and the log gets at most one INFO line a
    second for it, no ERROR and no traceback."""
    log.setup("info", "text")
    try:
        config = Config(data_dir=tmp_path / "data", upstreams=(UpstreamConfig(url="http://127.0.0.1:9", default=True),))
        client = await aiohttp_client(create_app(config))
        capsys.readouterr()
        started = time.monotonic()
        for _ in range(20):
            reader, writer = await asyncio.open_connection(client.host, client.port)
            writer.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nnot a header\r\n\r\n")
            answer = await reader.read()  # the server answers and closes
            assert answer.split(b" ", 2)[1] == b"400", answer[:100]
            writer.close()
        elapsed = time.monotonic() - started
        lines = [line for line in capsys.readouterr().err.splitlines() if "aiohttp.server" in line]
        assert 1 <= len(lines) <= 1 + elapsed
        assert all("INFO" in line and "rejected a malformed request from 127.0.0.1: 400" in line for line in lines)
    finally:
        log.setup("warning", "text")
    assert "Traceback" not in capsys.readouterr().err


def test_parser_errors_are_rate_limited_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    errors = log.ParserErrors(interval=1.0)

    def record(at: float) -> logging.LogRecord:
        exc = BadHttpMessage("Invalid header\n\n    b'not a header'\n    ^")
        entry = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error from %s", ("192.0.2.1",), None)
        entry.exc_info = (BadHttpMessage, exc, None)
        entry.created = at
        return entry

    first, second, third, fourth = (record(t) for t in (100.0, 100.1, 100.9, 101.2))
    assert [errors.filter(r) for r in (first, second, third, fourth)] == [True, False, False, True]
    assert first.getMessage() == "rejected a malformed request from 192.0.2.1: 400 Invalid header b'not a header' ^"
    assert first.levelname == "INFO" and first.exc_info is None
    assert fourth.getMessage().endswith("(2 more since the last line)")
    other = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error handling request", (), None)
    other.exc_info = (ValueError, ValueError("a bug"), None)
    assert errors.filter(other) and other.levelno == logging.ERROR  # a handler's exception keeps its traceback
