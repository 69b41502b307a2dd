"""Registry errors, defined once with their OCI code and HTTP status.

Handlers and services raise these; one middleware renders them as
``{"errors": [{"code": ..., "message": ..., "detail": ...}]}`` (OCI distribution spec, "Error Codes").
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    """Base class: every subclass fixes an OCI error code and the HTTP status it is sent with."""

    code: ClassVar[str] = "UNKNOWN"
    status: int = 500
    default_message: ClassVar[str] = "unknown error"

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ):
        if status is not None:
            self.status = status
        self.message = message or self.default_message
        self.detail = detail
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


def _error(name: str, code: str, status: int, message: str) -> type[RegistryError]:
    return type(name, (RegistryError,), {"code": code, "status": status, "default_message": message})


BlobUnknown = _error("BlobUnknown", "BLOB_UNKNOWN", 404, "blob unknown to registry")
BlobUploadInvalid = _error("BlobUploadInvalid", "BLOB_UPLOAD_INVALID", 400, "blob upload invalid")
BlobUploadUnknown = _error("BlobUploadUnknown", "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry")
DigestInvalid = _error("DigestInvalid", "DIGEST_INVALID", 400, "provided digest did not match uploaded content")
ManifestBlobUnknown = _error(
    "ManifestBlobUnknown", "MANIFEST_BLOB_UNKNOWN", 400, "manifest references a blob unknown to registry"
)
ManifestInvalid = _error("ManifestInvalid", "MANIFEST_INVALID", 400, "manifest invalid")
ManifestUnknown = _error("ManifestUnknown", "MANIFEST_UNKNOWN", 404, "manifest unknown to registry")
NameInvalid = _error("NameInvalid", "NAME_INVALID", 400, "invalid repository name")
NameUnknown = _error("NameUnknown", "NAME_UNKNOWN", 404, "repository name not known to registry")
SizeInvalid = _error("SizeInvalid", "SIZE_INVALID", 400, "provided length did not match content length")
Unauthorized = _error("Unauthorized", "UNAUTHORIZED", 401, "authentication required")
Denied = _error("Denied", "DENIED", 403, "requested access to the resource is denied")
Unsupported = _error("Unsupported", "UNSUPPORTED", 405, "the operation is unsupported")
TooManyRequests = _error("TooManyRequests", "TOOMANYREQUESTS", 429, "too many requests")
RangeInvalid = _error("RangeInvalid", "RANGE_INVALID", 416, "requested range not satisfiable")
PaginationInvalid = _error("PaginationInvalid", "PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested")
NotFound = _error("NotFound", "NOT_FOUND", 404, "no such endpoint")
UpstreamUnavailable = _error("UpstreamUnavailable", "UNAVAILABLE", 503, "the upstream registry is unavailable")
UpstreamBadGateway = _error("UpstreamBadGateway", "UNAVAILABLE", 502, "the upstream registry answered with an error")
InsufficientStorage = _error("InsufficientStorage", "UNAVAILABLE", 507, "the mirror's disk is full")
Busy = _error("Busy", "UNAVAILABLE", 503, "another process is removing content; try again later")
