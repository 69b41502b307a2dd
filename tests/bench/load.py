"""Load generators and meters: curl for bulk bytes (C, sendfile-speed clients), wrk for many small requests,
skopeo for a real pull, and the peak resident memory of a process tree."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.ops import require

MiB = 1 << 20
MANIFEST_ACCEPT = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"
)


@dataclass
class Downloads:
    seconds: float  # wall time from the first start to the last finish
    total_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / self.seconds / 1e6


def download(urls: list[str], expected_size: int, follow: bool = False) -> Downloads:
    """Download every URL at once, one curl each, into /dev/null; every answer must be a 200 of the full size
    (``follow``: after the redirects curl follows)."""
    curl = require("curl")
    fmt = "%{http_code} %{size_download}"
    started = time.monotonic()
    argv = [curl, "-s", "-o", "/dev/null", "-w", fmt, *(["-L"] if follow else [])]
    procs = [subprocess.Popen([*argv, url], stdout=subprocess.PIPE, text=True) for url in urls]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    seconds = time.monotonic() - started
    for url, out in zip(urls, outputs, strict=True):
        status, size = out.split()
        if status != "200" or int(size) != expected_size:
            raise RuntimeError(f"GET {url}: {status}, {size} of {expected_size} bytes")
    return Downloads(seconds, expected_size * len(urls))


@dataclass
class Rate:
    requests_per_s: float
    errors: int


def wrk(url: str, seconds: float, connections: int = 32, method: str = "GET", accept: str | None = None) -> Rate:
    """``wrk`` at ``connections`` connections (2 threads); non-2xx answers and socket errors are counted."""
    argv = [require("wrk"), f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds:g}s"]
    script = None
    if method != "GET":
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115 - removed below
        script.write(f'wrk.method = "{method}"\n')
        script.close()
        argv += ["-s", script.name]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    try:
        out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        if script is not None:
            Path(script.name).unlink()
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Rate(float(rate.group(1)), errors)


def ab_head(url: str, seconds: float, connections: int = 32, accept: str | None = None) -> Rate:
    """HEAD requests with ApacheBench (``ab -k -i``): wrk 4.1 waits for a body after a HEAD answer and stalls."""
    argv = [require("ab"), "-k", "-i", "-q", "-c", str(connections), "-t", f"{seconds:g}", "-n", "100000000"]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rate = re.search(r"Requests per second:\s+([\d.]+)", out)
    if rate is None:
        raise RuntimeError(f"ab printed no rate:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:Failed requests|Non-2xx responses):\s+(\d+)", out))
    return Rate(float(rate.group(1)), errors)


def skopeo_pulls(host: str, ref: str, clients: int) -> float:
    """Wall time of ``clients`` parallel ``skopeo copy`` of ``ref`` (the host's platform) into scratch dirs."""
    skopeo = require("skopeo")
    with tempfile.TemporaryDirectory(prefix="bench-skopeo-") as scratch:
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [skopeo, "copy", "--src-tls-verify=false", f"docker://{host}/{ref}", f"dir:{scratch}/{i}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(clients)
        ]
        failures = [p.communicate(timeout=1800)[1] for p in procs if p.wait(timeout=1800) != 0]
        seconds = time.monotonic() - started
    if failures:
        raise RuntimeError(f"skopeo copy of {ref} from {host} failed: {failures[0][-2000:]}")
    return seconds


class PeakRss:
    """The most memory ``pid`` and all its descendants (a mirror's worker processes) held together while the
    block ran: the sum of their resident sizes sampled every 20 ms (the tree is re-read every 0.5 s), and at the
    end the sum of their kernel high-water marks (``VmHWM``, reset at the start through ``/proc/PID/clear_refs``
    where allowed) if that is larger. For one process that is its high-water mark; for several, the sum of
    their marks bounds the peak of the sum from above. Pages shared between processes count in each."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_kib = 0
        self.processes = 1  # the most processes seen in the tree at once
        self._stop = threading.Event()
        self._pids: list[int] = [pid]

    def _refresh(self) -> None:
        pids = process_tree(self.pid)
        for pid in set(pids) - set(self._pids):
            _reset_hwm(pid)
        self._pids = pids
        self.processes = max(self.processes, len(pids))

    def _poll(self) -> None:
        ticks = 0
        while not self._stop.wait(0.02):
            ticks += 1
            if ticks % 25 == 0:
                self._refresh()
            self.peak_kib = max(self.peak_kib, sum(_status_kib(pid, "VmRSS") for pid in self._pids))

    def __enter__(self) -> PeakRss:
        self._pids = process_tree(self.pid)
        self.processes = len(self._pids)
        for pid in self._pids:
            _reset_hwm(pid)
        self.peak_kib = sum(_status_kib(pid, "VmRSS") for pid in self._pids)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        self.peak_kib = max(self.peak_kib, sum(_status_kib(pid, "VmHWM") for pid in self._pids))

    @property
    def mib(self) -> float:
        return self.peak_kib / 1024


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant of it, from the parent ids in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _status_kib(pid: int, name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0  # exited
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def _reset_hwm(pid: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
