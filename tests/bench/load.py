"""Load clients and samplers: a raw-socket HTTP/1.1 getter (``recv_into`` a 4 MiB buffer, bytes discarded: far
faster than any server here), wrk for request rates, parallel ``skopeo copy``, and a peak-RSS sampler."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

BUFFER = 4 << 20


@dataclass
class Got:
    status: int
    size: int
    seconds: float


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 600) -> Got:
    """GET ``url``, discarding the body; follows no redirects. Reads to the Content-Length (or to the close)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    started = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n{extra}\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{url}: closed before the headers")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        got = len(rest)
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        while length is None or got < length:
            n = sock.recv_into(view)
            if n == 0:
                break
            got += n
    seconds = time.perf_counter() - started
    if length is not None and got != length:
        raise ConnectionError(f"{url}: {got} of {length} bytes")
    return Got(status, got, seconds)


@dataclass
class Parallel:
    seconds: float  # wall time from the first request sent to the last byte received
    bytes: int
    statuses: list[int]

    @property
    def throughput(self) -> float:  # bytes per second, all clients together
        return self.bytes / self.seconds


def parallel_get(url: str, clients: int, expect: int | None = None) -> Parallel:
    """``clients`` GETs of ``url`` at once (one thread each, released together); fails if any is short or not 200."""
    results: list[Got | BaseException] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients + 1)

    def one() -> None:
        gate.wait()
        try:
            got: Got | BaseException = get(url)
        except BaseException as exc:  # noqa: BLE001 - reported below
            got = exc
        with lock:
            results.append(got)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    gots = [r for r in results if isinstance(r, Got)]
    bad = [g for g in gots if g.status != 200 or (expect is not None and g.size != expect)]
    if bad:
        raise AssertionError(f"{url}: {len(bad)} of {clients} answers wrong: {bad[0]}")
    return Parallel(seconds, sum(g.size for g in gots), [g.status for g in gots])


# --- wrk ---------------------------------------------------------------------------------------------------------
@dataclass
class Rate:
    requests_per_second: float
    requests: int
    errors: int  # non-2xx/3xx answers and socket errors
    latency_p50_ms: float


def _ms(value: str) -> float:
    number = float(re.sub(r"[a-z]+$", "", value))
    unit = re.sub(r"^[\d.]+", "", value)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(
    url: str, seconds: float, connections: int = 32, method: str = "GET", headers: dict[str, str] | None = None
) -> Rate:
    """``wrk`` (one thread: the other core is the server's) at ``connections`` for ``seconds``."""
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")
    lines = [f'wrk.method = "{method}"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        out = subprocess.run(
            [binary, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        ).stdout  # fmt: skip
    finally:
        Path(script.name).unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    p50 = re.search(r"50%\s+([\d.]+[a-z]+)", out)
    return Rate(rps, total, errors, _ms(p50.group(1)) if p50 else 0.0)


# --- HEAD: wrk 4.1 waits for a body after a HEAD answer with a Content-Length, so HEADs get this client ---------
def head_rate(url: str, seconds: float, connections: int = 32, headers: dict[str, str] | None = None) -> Rate:
    """Keep-alive ``HEAD`` requests on ``connections`` connections (asyncio, raw sockets, one request in flight per
    connection, like wrk) for ``seconds``. Its own ceiling is measured against nginx by the caller."""
    return asyncio.run(_head_rate(url, seconds, connections, headers or {}))


async def _head_rate(url: str, seconds: float, connections: int, headers: dict[str, str]) -> Rate:
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"HEAD {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{extra}\r\n".encode()
    deadline = time.perf_counter() + seconds
    counts = {"ok": 0, "bad": 0}
    latencies: list[float] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if len(latencies) < 100_000:
                    latencies.append(time.perf_counter() - sent)
                counts["ok" if head[9:10] in (b"2", b"3") else "bad"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    results = await asyncio.gather(*(connection() for _ in range(connections)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    errors = counts["bad"] + sum(1 for r in results if isinstance(r, BaseException))
    total = counts["ok"] + counts["bad"]
    p50 = statistics.median(latencies) * 1000 if latencies else 0.0
    return Rate(total / elapsed, total, errors, p50)


# --- skopeo ------------------------------------------------------------------------------------------------------
def parallel_skopeo(source: str, clients: int, work: Path) -> float:
    """``clients`` parallel ``skopeo copy docker://SOURCE dir:...`` (the host's platform out of the index); the wall
    time in seconds. Each copy goes to its own fresh directory."""
    binary = shutil.which("skopeo")
    if binary is None:
        raise SystemExit("bench: skopeo is not installed")
    dests = [Path(tempfile.mkdtemp(prefix="copy-", dir=work)) for _ in range(clients)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [binary, "copy", "--quiet", "--src-tls-verify=false", f"docker://{source}", f"dir:{dest}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for dest in dests
    ]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    seconds = time.perf_counter() - started
    for dest in dests:
        shutil.rmtree(dest, ignore_errors=True)
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise AssertionError(f"skopeo copy {source} failed: {out.decode(errors='replace')[-2000:]}")
    return seconds


# --- memory ------------------------------------------------------------------------------------------------------
def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakRss:
    """Samples a process's VmRSS every 10 ms from a thread while in the ``with`` block; ``peak_mib`` is the max."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            except FileNotFoundError:
                return
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRss:
        self.peak_kib = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024
