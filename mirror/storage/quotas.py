"""The upstreams' saving windows, shared by the processes on one data dir (``upstream.quota.QuotaRecord``).

Layout::

    quota/
      <sha256 of the registry name, 16 hex>.json    {"registry": "docker.io", "until": 1700000600.0,
                                                     "reason": "rate_limited"}; written to a temp file and
                                                     renamed, so a reader sees the old record or the new one

Only processes that share the data dir (``Config.coordination = "files"``) have these files. Every method blocks:
call it in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


class QuotaFile:
    """One upstream's record. It satisfies ``upstream.quota.QuotaRecord`` (storage and upstream do not import
    each other: the composition root hands it over, and mypy checks it there)."""

    def __init__(self, data_dir: Path, registry: str):
        self.directory = data_dir / "quota"
        self.registry = registry
        self.path = self.directory / f"{hashlib.sha256(registry.encode()).hexdigest()[:16]}.json"

    def read_sync(self) -> tuple[float, str]:
        try:
            record = json.loads(self.path.read_text())
            return float(record["until"]), str(record["reason"])
        except FileNotFoundError:
            return 0.0, ""
        except (ValueError, KeyError, TypeError):
            return 0.0, ""  # half-written by hand, or damaged: as if there were none

    def write_sync(self, until: float, reason: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            temp.write_text(json.dumps({"registry": self.registry, "until": until, "reason": reason}))
            os.replace(temp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
