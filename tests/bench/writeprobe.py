"""``python -m tests.bench.writeprobe [DIR]``: how fast this machine takes new data into files, the ceiling of any
cache's miss path (a cache must keep what it fetches; "direct from the upstream" keeps nothing).

Writes 256 MiB files in 1 MiB pieces, six rounds each way: deleting every file after writing it (its page cache
is recycled for the next), and keeping them all (every round needs memory the kernel has not handed out yet).
On some virtual machines the second rate is several times lower than the first.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
FILE = 256 * MiB


def write(path: Path, piece: bytes) -> float:
    started = time.monotonic()
    with open(path, "wb") as fh:
        for _ in range(FILE // len(piece)):
            fh.write(piece)
    return FILE / (time.monotonic() - started) / 1e6


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="writeprobe-", dir=sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"))
    piece = os.urandom(MiB)
    try:
        for keep in (False, True):
            rates = []
            for i in range(6):
                path = root / f"f{i}"
                rates.append(write(path, piece))
                if not keep:
                    path.unlink()
            label = "kept (new memory each round)" if keep else "deleted after each round   "
            print(f"{label}: " + ", ".join(f"{r:,.0f}" for r in rates) + " MB/s", flush=True)
            for path in root.iterdir():
                path.unlink()
    finally:
        for path in root.iterdir():
            path.unlink()
        root.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
