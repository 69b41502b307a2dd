"""Inbound credentials for tests: htpasswd files written by the real ``htpasswd -B`` and Basic headers."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from tests.support.ops import require


def make_htpasswd(path: Path, *users: tuple[str, str]) -> Path:
    """Write entries with the real ``htpasswd -B`` (Debian apache2-utils), at bcrypt cost 5 to keep tests fast."""
    tool = require("htpasswd")
    for number, (user, password) in enumerate(users):
        flags = "-bBC" if path.exists() or number else "-cbBC"
        subprocess.run([tool, flags, "5", str(path), user, password], check=True, capture_output=True)
    return path


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
