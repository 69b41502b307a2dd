"""A writer on a full disk: the error says so, and the temp file goes even though closing it fails too.

(The same with a real full filesystem, a tmpfs, is ``tests/integration/test_disk_full.py``; this pins the case
where close() fails again flushing the buffered bytes, which left temp files behind.)
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from mirror.storage.blobs import BlobStore
from mirror.storage.writer import DiskFull


class FullFile:
    """Stands in for the temp file of a writer on a full disk: every write, flush and close fails."""

    def __init__(self, real: Any):
        self.real = real

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.real.close()
        raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self) -> int:
        return int(self.real.fileno())


async def test_disk_full_while_writing_removes_the_temp_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    writer = store.writer()
    # A stand-in for the open temp file that fails like a full disk; it is not a BufferedWriter, only duck-types one.
    writer._file = FullFile(writer._file)  # type: ignore[assignment]
    with pytest.raises(DiskFull):
        await writer.write(b"x" * 1000)
    await writer.abort()
    assert list(store.tmp_dir.iterdir()) == []


def test_a_blob_larger_than_the_free_space_is_refused_up_front(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.check_space_sync(1024)
    with pytest.raises(DiskFull, match="needed"):
        store.check_space_sync(1 << 62)
