"""One row of the usage table (``storage.usage``, and the replicas' ``storage.redisusage``): the size, kind,
last-served time, pushed mark and first repository of one stored digest."""

from __future__ import annotations

from dataclasses import dataclass

LOCAL = 1  # flags bit: pushed to this mirror, not pulled through; eviction never removes it
KINDS = ("blob", "manifest")


@dataclass(slots=True)
class Entry:
    size: int
    last_served: float  # wall-clock time a client last received it (or when it was stored)
    kind: str = "blob"  # "blob" or "manifest"
    local: bool = False
    repo: str = ""

    def row(self) -> tuple[int, float, str, int, str]:
        return (self.size, self.last_served, self.kind, LOCAL if self.local else 0, self.repo)

    @classmethod
    def from_row(cls, row: object) -> Entry | None:
        if not isinstance(row, tuple) or len(row) != 5:
            return None
        size, last_served, kind, flags, repo = row
        return cls(int(size), float(last_served), str(kind), bool(int(flags) & LOCAL), str(repo))
