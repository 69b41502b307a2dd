"""How much memory a piece of a test took: tracemalloc's peak of Python allocations (the assertion: exact, and
blind to what other tests did before), and the growth of the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` first; a figure for the record, since freed memory the allocator kept is reused)."""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


@dataclass
class Peak:
    traced: int = 0  # bytes: tracemalloc's peak
    rss_growth: int | None = None  # bytes: VmHWM after minus VmRSS before (None without /proc)


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


@contextlib.contextmanager
def memory_peak(what: str) -> Iterator[Peak]:
    peak = Peak()
    rss_before = _status_kib("VmRSS")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        hwm = _status_kib("VmHWM")
        if hwm is not None and rss_before is not None:
            peak.rss_growth = (hwm - rss_before) * 1024
        growth = f"{peak.rss_growth / MiB:.1f} MiB" if peak.rss_growth is not None else "n/a"
        print(f"\n[memory] {what}: tracemalloc peak {peak.traced / MiB:.1f} MiB, peak RSS growth {growth}")
