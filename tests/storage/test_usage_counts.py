"""The per-repository counters the web page's overview reads on every load (``Usage.repo_counts_kept_sync``): read
from disk once, then kept current with this process's additions, and read again after a reload."""

from __future__ import annotations

from pathlib import Path

from mirror.storage.usage import Usage


def test_the_kept_repository_counters_follow_additions_and_reloads(tmp_path: Path) -> None:
    """``Usage.repo_counts_kept_sync`` (the overview's counters): one walk, then this process's additions."""
    usage = Usage(tmp_path)
    usage.add_repo_counts_sync({("docker.io/library/a", "blob_hit"): 2})
    assert usage.repo_counts_kept_sync() == usage.repo_counts_sync() == {"docker.io/library/a": {"blob_hit": 2}}
    usage.add_repo_counts_sync({("docker.io/library/a", "blob_hit"): 3, ("docker.io/library/b", "blob_miss"): 1})
    assert usage.repo_counts_kept_sync() == usage.repo_counts_sync()
    other = Usage(tmp_path)  # another process on the data dir counts too...
    other.add_repo_counts_sync({("docker.io/library/c", "tag_hit"): 1})
    assert "docker.io/library/c" not in usage.repo_counts_kept_sync()
    usage.install(*usage.load_sync())  # ...and the serving process sees it after its reload
    assert usage.repo_counts_kept_sync() == usage.repo_counts_sync()
    other.close()
    usage.close()
