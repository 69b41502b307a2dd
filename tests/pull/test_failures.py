"""The one domain -> OCI error table (``pull.failures``): what a client sees for each way an upstream (or the disk)
can fail, and that a 404 becomes the caller's own "not there" error."""

from __future__ import annotations

import pytest

from mirror.oci import errors
from mirror.pull.failures import failure, upstream_errors
from mirror.storage.writer import DiskFull
from mirror.upstream.bodies import BodyTooLarge, TooSlow
from mirror.upstream.errors import UpstreamError, UpstreamInvalid, UpstreamUnreachable

TABLE = [
    pytest.param(UpstreamError(429, retry_after="7"), "TOOMANYREQUESTS", 429, id="upstream 429 -> 429 TOOMANYREQUESTS"),
    pytest.param(UpstreamError(401), "DENIED", 403, id="upstream 401 -> 403 DENIED"),
    pytest.param(UpstreamError(403), "DENIED", 403, id="upstream 403 -> 403 DENIED"),
    pytest.param(UpstreamError(503), None, 503, id="upstream 503 -> 503"),
    pytest.param(UpstreamError(404), None, 502, id="upstream 404 without a caller's meaning -> 502"),
    pytest.param(UpstreamError(418), None, 502, id="upstream 418 -> 502"),
    pytest.param(UpstreamInvalid("no digest"), None, 502, id="invalid content -> 502"),
    pytest.param(BodyTooLarge("blob", 10, "max_blob_size"), None, 502, id="body too large -> 502"),
    pytest.param(DiskFull("full"), None, 507, id="disk full -> 507"),
    pytest.param(TooSlow("slow"), None, 503, id="too slow -> 503"),
    pytest.param(UpstreamUnreachable("refused"), None, 503, id="unreachable -> 503"),
    pytest.param(TimeoutError(), None, 503, id="timeout -> 503"),
    pytest.param(RuntimeError("bug"), "UNKNOWN", 500, id="anything else -> 500 UNKNOWN"),
]


@pytest.mark.parametrize(("exc", "code", "status"), TABLE)
def test_failure_table(exc: BaseException, code: str | None, status: int) -> None:
    error = failure(exc)
    assert error.status == status
    if code is not None:
        assert error.code == code


def test_retry_after_is_passed_on() -> None:
    assert failure(UpstreamError(429, retry_after="7")).headers == {"Retry-After": "7"}


def test_a_404_is_the_callers_not_found() -> None:
    unknown = errors.BlobUnknown("blob x is not in y")
    assert failure(UpstreamError(404), lambda: unknown) is unknown
    assert failure(UpstreamError(500), lambda: unknown).status == 503


def test_registry_errors_pass_through() -> None:
    denied = errors.Denied("no")
    assert failure(denied) is denied
    with pytest.raises(errors.Denied), upstream_errors():
        raise denied


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(UpstreamError(404), errors.ManifestUnknown, id="404 inside -> the caller's error"),
        pytest.param(UpstreamUnreachable("down"), errors.UpstreamUnavailable, id="unreachable inside -> 503"),
        pytest.param(DiskFull("full"), errors.InsufficientStorage, id="disk full inside -> 507"),
    ],
)
def test_upstream_errors_context(exc: BaseException, expected: type[errors.RegistryError]) -> None:
    with pytest.raises(expected), upstream_errors(not_found=lambda: errors.ManifestUnknown("gone")):
        raise exc


def test_upstream_errors_leaves_other_exceptions_alone() -> None:
    with pytest.raises(KeyError), upstream_errors():
        raise KeyError("a bug stays a bug")
