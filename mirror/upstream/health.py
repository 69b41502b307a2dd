"""How an upstream has been answering lately, as the web page's upstreams page shows it."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class Health:
    """The last outcomes of the requests to one upstream, for the web page (memory only, two fields): when it
    last answered (anything but a failure: a 404 is an answer) and when and how it last failed (unreachable, an
    error status, a 429)."""

    last_success: float | None = None  # wall-clock time
    last_error: float | None = None
    last_error_reason: str = ""

    def record(self, outcome: str, reason: str) -> None:
        if outcome in ("unreachable", "error", "rate_limited"):
            self.last_error, self.last_error_reason = time.time(), reason[:300]
        else:
            self.last_success = time.time()
