"""Metrics for the whole host: prometheus-client's multiprocess mode, for several processes serving one port on
one data dir (``mirror serve --workers N``).

The supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` (the library's standard variable) to a directory it empties at
start, and calls ``prometheus_client.multiprocess.mark_process_dead(pid)`` when a worker exits. With it, every
counter, histogram and gauge of ``Metrics`` keeps its value in a file of this process in that directory (an
mmap), and ``/metrics``, whichever process takes the scrape, answers from every file::

    $PROMETHEUS_MULTIPROC_DIR/
        counter_<pid>.db          counters: summed over the processes, the dead ones' included
        histogram_<pid>.db        histograms: buckets, sums and counts summed likewise
        gauge_livesum_<pid>.db    work under way in a process: summed over live processes (mark_process_dead
                                  removes a dead one's file)
        gauge_mostrecent_<pid>.db what every process sees alike (an upstream's announced quota): the latest set

What belongs to no one process is not written by each: the cache's fill (the usage table, on disk and shared)
and the upload sessions (files in the data dir) are read by the process that takes the scrape. The per-repository
counters are summed like the others, then cut to the top repositories (``collectors.top_repos``).

Increments wait in memory (``BufferedValue``) and are written to the file at most ``FLUSH_SECONDS`` later
(``flush_values``: by a timer of each process, before a process reads the files, and when it stops). Writing
the mmap at every increment took a tenth of a worker's time on small requests; the cost of the buffer is that
another process's scrape sees this one's last second late, and a worker killed with SIGKILL loses its last
second of counts (Prometheus's ``rate`` and ``increase`` treat that like any counter that stopped early).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, values
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mirror.metrics.collectors import RepoStats, top_repos

ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_SECONDS = 1.0


def shared_dir() -> str | None:
    """The directory of the multiprocess mode, or None (one process: values in memory, as the library's
    default). A directory that is not there is an error at start-up, not at the first increment."""
    path = os.environ.get(ENV)
    if not path:
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{ENV}={path} is not a directory")
    return path


def use_value_class(shared: bool) -> None:
    """Make prometheus-client keep the values of the metrics built from now on in files (``shared``) or in memory.

    The library picks its value class once, when it is imported (``values.ValueClass``, from the environment of
    that moment), and every metric looks the class up when it is built. A supervisor imports the package before it
    sets the variable for its workers, so the choice is made again here, when ``Metrics`` is built. One
    ``MultiProcessValue`` per process, kept if it is there already: a second one would map the same files again
    and overwrite the first one's values.
    """
    in_files = bool(getattr(values.ValueClass, "_multiprocess", False))
    if shared and not in_files:
        values.ValueClass = buffered_value_class()
    elif not shared and in_files:
        values.ValueClass = values.MutexValue


def buffered_value_class() -> type:
    """The library's file-backed value class (``MultiProcessValue``), its increments kept in memory until
    ``flush``. Thread-safe: one lock for the pending amounts, taken before the library's own."""
    file_value: Any = values.MultiProcessValue()  # type: ignore[no-untyped-call]  # unannotated
    lock = threading.Lock()
    pending: dict[Any, float] = {}  # value -> the amount not yet written to its file

    class BufferedValue(file_value):  # type: ignore[misc]  # a class the library makes at run time
        def inc(self, amount: float) -> None:
            with lock:
                pending[self] = pending.get(self, 0.0) + amount

        def set(self, value: float, timestamp: float | None = None) -> None:
            with lock:
                pending.pop(self, None)
                super().set(value, timestamp)

        def get(self) -> float:
            with lock:
                return float(super().get()) + pending.get(self, 0.0)

        @staticmethod
        def flush() -> None:
            with lock:
                for value, amount in pending.items():
                    file_value.inc(value, amount)
                pending.clear()

    atexit.register(BufferedValue.flush)  # a process that ends normally (a CLI command) loses nothing
    return BufferedValue


def flush_values() -> None:
    """Write this process's pending increments to its files (nothing to do when values live in memory)."""
    flush = getattr(values.ValueClass, "flush", None)
    if flush is not None:
        flush()


async def flushing(every: float = FLUSH_SECONDS) -> AsyncIterator[None]:
    """For ``app.cleanup_ctx``: flush every ``every`` seconds while the app runs, and once more when it stops."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(every)
            flush_values()

    task = asyncio.get_running_loop().create_task(loop(), name="metrics flush")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        flush_values()


class HostCollector(Collector):
    """Every process's files merged, then the collectors read by the scraping process (``local``). Reads files:
    collect it in a thread, never on the event loop."""

    def __init__(self, path: str, repos: RepoStats, local: Sequence[Collector]):
        self.path = path
        self.repos = repos
        self.local = local

    def collect(self) -> Iterator[Metric]:
        flush_values()  # this process's own figures up to now
        files = glob.glob(os.path.join(self.path, "*.db"))
        merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]  # unannotated
        yield from top_repos(merged, self.repos.top, self.repos.allowlist)
        for collector in self.local:
            yield from collector.collect()


def host_registry(path: str, repos: RepoStats, local: Sequence[Collector]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(path, repos, local))
    return registry
