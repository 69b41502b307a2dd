"""The one table from domain failures (the upstream's, the store's) to the OCI errors a client sees.

Lower layers raise domain errors with fields (``UpstreamError`` with the upstream's status, ``UpstreamInvalid``,
``DiskFull``, ``TooSlow``); the pull service turns them into ``oci.errors.RegistryError``s here and nowhere else,
and the middleware renders those. A 404 means "not there" in the caller's own words (blob, manifest, repository,
referrers), so the caller names the error it becomes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import aiohttp

from mirror.oci import errors
from mirror.storage.base import StoreUnavailable
from mirror.storage.writer import DiskFull
from mirror.upstream.bodies import TooSlow
from mirror.upstream.errors import UpstreamError, UpstreamInvalid, UpstreamUnreachable

NotFound = Callable[[], errors.RegistryError]
# What asking an upstream (or storing its answer) may raise besides registry errors.
UPSTREAM_FAILURES = (UpstreamError, UpstreamUnreachable, UpstreamInvalid, TimeoutError, DiskFull)


def failure(exc: BaseException, not_found: NotFound | None = None) -> errors.RegistryError:
    """The registry error a client sees for ``exc``: ``not_found()`` for an upstream 404 when given."""
    if isinstance(exc, errors.RegistryError):
        return exc
    if isinstance(exc, UpstreamError):
        if exc.status == 404 and not_found is not None:
            return not_found()
        if exc.status == 429:
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
            return errors.TooManyRequests("the upstream registry is rate limiting the mirror", headers=headers)
        if exc.status in (401, 403):
            return errors.Denied(
                f"the upstream refused access ({exc.status}): the repository does not exist or the mirror's "
                "credentials for it are missing or wrong",
                detail={"upstream_status": exc.status, "upstream_errors": exc.errors},
            )
        if exc.status >= 500:
            return errors.UpstreamUnavailable(
                f"the upstream answered {exc.status}", detail={"upstream_status": exc.status}
            )
        return errors.UpstreamBadGateway(
            str(exc), detail={"upstream_status": exc.status, "upstream_errors": exc.errors}
        )
    if isinstance(exc, UpstreamInvalid):
        return errors.UpstreamBadGateway(f"the upstream sent invalid content: {exc}")
    if isinstance(exc, StoreUnavailable):
        return errors.UpstreamUnavailable(f"the mirror's object store cannot be reached; nothing was stored: {exc}")
    if isinstance(exc, DiskFull):
        return errors.InsufficientStorage(f"the mirror's disk is full; the content was not cached: {exc}")
    if isinstance(exc, TooSlow):
        return errors.UpstreamUnavailable(f"the upstream is too slow: {exc}")
    if isinstance(exc, UpstreamUnreachable | TimeoutError | aiohttp.ClientError | OSError):
        return errors.UpstreamUnavailable(f"the upstream registry could not be reached: {str(exc) or 'timed out'}")
    return errors.RegistryError(f"fetch failed: {exc!r}")


@contextmanager
def upstream_errors(not_found: NotFound | None = None) -> Iterator[None]:
    """Raise the registry error of any ``UPSTREAM_FAILURES`` raised inside (``not_found()`` for a 404); registry
    errors and anything else pass through unchanged."""
    try:
        yield
    except UPSTREAM_FAILURES as exc:
        raise failure(exc, not_found) from None


def retryable(exc: BaseException) -> bool:
    """Failures after which a stale answer is better than an error."""
    if isinstance(exc, UpstreamError):
        return exc.unavailable
    return isinstance(exc, UpstreamUnreachable | TimeoutError)
