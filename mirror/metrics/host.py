"""Metrics for the whole host: prometheus-client's multiprocess mode, for several processes serving one port on
one data dir (``mirror serve --workers N``).

The supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` (the library's standard variable) to a directory it empties at
start, and calls ``prometheus_client.multiprocess.mark_process_dead(pid)`` when a worker exits. With it, every
counter, histogram and gauge of ``Metrics`` keeps its value in a file of this process in that directory (an
mmap: an increment is still a store to memory, no system call), and ``/metrics``, whichever process takes the
scrape, answers from every file::

    $PROMETHEUS_MULTIPROC_DIR/
        counter_<pid>.db          counters: summed over the processes, the dead ones' included
        histogram_<pid>.db        histograms: buckets, sums and counts summed likewise
        gauge_livesum_<pid>.db    work under way in a process: summed over live processes (mark_process_dead
                                  removes a dead one's file)
        gauge_mostrecent_<pid>.db what every process sees alike (an upstream's announced quota): the latest set

What belongs to no one process is not written by each: the cache's fill (the usage table, on disk and shared)
and the upload sessions (files in the data dir) are read by the process that takes the scrape. The per-repository
counters are summed like the others, then cut to the top repositories (``collectors.top_repos``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, values
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mirror.metrics.collectors import RepoStats, top_repos

ENV = "PROMETHEUS_MULTIPROC_DIR"


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
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]  # unannotated
    elif not shared and in_files:
        values.ValueClass = values.MutexValue


class HostCollector(Collector):
    """Every process's files merged, then the collectors read by the scraping process (``local``). Reads files:
    collect it in a thread, never on the event loop."""

    def __init__(self, path: str, repos: RepoStats, local: Sequence[Collector]):
        self.path = path
        self.repos = repos
        self.local = local

    def collect(self) -> Iterator[Metric]:
        files = glob.glob(os.path.join(self.path, "*.db"))
        merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]  # unannotated
        yield from top_repos(merged, self.repos.top, self.repos.allowlist)
        for collector in self.local:
            yield from collector.collect()


def host_registry(path: str, repos: RepoStats, local: Sequence[Collector]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(path, repos, local))
    return registry
