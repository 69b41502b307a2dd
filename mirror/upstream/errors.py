"""What can go wrong when asking an upstream, as data the pull-through service can decide on."""

from __future__ import annotations

from typing import Any


class UpstreamError(Exception):
    """The upstream answered, with an error status.

    ``errors`` is the upstream's own registry error list when it sent one. ``unavailable`` is true for answers
    that say "ask again later" (5xx, 429): the cases where a stale answer from the cache beats an error.
    """

    def __init__(
        self,
        status: int,
        errors: list[dict[str, Any]] | None = None,
        retry_after: str | None = None,
        url: str = "",
    ):
        self.status = status
        self.errors = errors or []
        self.retry_after = retry_after
        self.url = url
        first = self.errors[0].get("message", "") if self.errors else ""
        super().__init__(f"upstream answered {status} for {url}" + (f": {first}" if first else ""))

    @property
    def unavailable(self) -> bool:
        return self.status >= 500 or self.status == 429

    @property
    def code(self) -> str | None:
        code = self.errors[0].get("code") if self.errors else None
        return code if isinstance(code, str) else None


class UpstreamUnreachable(Exception):
    """No answer: connection refused or reset, DNS failure, TLS failure, or a timeout."""


class UpstreamInvalid(Exception):
    """The upstream answered 200 with content that does not match what was asked for (wrong digest)."""
