"""SQLite's "database or disk is full" as the store's ``DiskFull``.

The index and the usage table are diskcache (SQLite) databases in the data dir: on a full filesystem their writes
fail with ``sqlite3.OperationalError`` (SQLITE_FULL), which callers would otherwise see as an unexpected error.
Their write methods carry ``@disk_full`` so that a full disk is one domain error whoever hits it first.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

from mirror.storage.writer import DiskFull

_P = ParamSpec("_P")
_T = TypeVar("_T")


def is_full(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or (code is None and "database or disk is full" in str(exc))


def disk_full(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """Raise DiskFull where ``method`` (a synchronous diskcache write) hits SQLITE_FULL."""

    @wraps(method)
    def mapped(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if is_full(exc):
                raise DiskFull(f"the index or usage database cannot grow: {exc}") from exc
            raise

    return mapped
