"""``--log-format json`` gives one parseable object per line, with the access log's fields as keys."""

from __future__ import annotations

import json
import logging

import pytest

from mirror import log


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
