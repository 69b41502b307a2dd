"""What the bucket's failures mean to the mirror: a missing key is "not stored"; anything else (unreachable,
refused, 5xx) is ``StoreUnavailable``, which clients get as a 503 registry error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from botocore.exceptions import BotoCoreError, ClientError

from mirror.storage.base import StoreUnavailable


def missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


@contextlib.contextmanager
def bucket_errors() -> Iterator[None]:
    """The bucket's failures as StoreUnavailable; a missing key's ClientError passes as it is."""
    try:
        yield
    except ClientError as exc:
        if missing(exc):
            raise
        raise StoreUnavailable(f"the bucket refused a request: {exc}") from exc
    except BotoCoreError as exc:
        raise StoreUnavailable(f"the bucket cannot be reached: {exc}") from exc
