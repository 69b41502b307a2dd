"""Helpers for the operating tests (eviction, gc, crash safety, the dashboard): polling with a deadline, a disk
watcher, and real parts: a Distribution registry, nginx in front of it, the mirror and its CLI as subprocesses,
(the plain-HTTP image pusher and puller are in ``tests.support.plain_http``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.support.netns import NamespaceHost


async def eventually(predicate: Callable[[], bool], within: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds. For background work we cannot await."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {within} s")
        await asyncio.sleep(0.01)


def wait_until(predicate: Callable[[], bool], within: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {within} s")
        time.sleep(0.02)


def bytes_under(*dirs: Path) -> int:
    total = 0
    for top in dirs:
        for root, _, files in os.walk(top):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, name)).st_size
    return total


def blob_files(data_dir: Path) -> dict[str, int]:
    """``{"sha256:...": size}`` of every file in the store."""
    found = {}
    for path in (data_dir / "blobs").glob("*/*/*"):
        found[f"{path.parent.parent.name}:{path.name}"] = path.stat().st_size
    return found


class DiskWatch:
    """Samples the bytes under blobs/ and tmp/ from a thread, as often as it can, and keeps the maximum."""

    def __init__(self, data_dir: Path):
        self.dirs = (data_dir / "blobs", data_dir / "tmp")
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, bytes_under(*self.dirs))
            self.samples += 1

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, bytes_under(*self.dirs))


# --- real parts: a Distribution registry, nginx in front of it, the mirror as a subprocess -----------------------
REPO_ROOT = Path(__file__).resolve().parents[2]


def require(binary: str) -> str:
    """The binary's path; a missing one skips the test, or fails it under CI=true."""

    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} is not installed (CI=true: a missing component fails)")
        pytest.skip(f"{binary} is not installed")
    return path


def free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, also: tuple[int, ...] = (), context: ssl.SSLContext | None = None) -> bool:
    """Whether ``url`` answers 200 (or one of the ``also`` statuses); ``context`` verifies an https server."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code in also
    except (urllib.error.URLError, OSError):
        return False


class Service:
    """A subprocess with its output in a log file; ``stop`` terminates it (kill after a grace period). It leads a
    process group of its own, so a kill reaches its children too (the workers of ``mirror serve --workers``)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log = log
        self._logfile = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, stdout=self._logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(
        self, url: str, within: float = 30.0, also: tuple[int, ...] = (), context: ssl.SSLContext | None = None
    ) -> None:
        deadline = time.monotonic() + within
        while not http_ok(url, also, context):
            if not self.alive():
                raise AssertionError(f"{self.args[0]} exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready within {within} s: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def kill9(self) -> None:
        """SIGKILL to the whole process group, as a crash: no cleanup runs."""
        self._kill_group()
        self.proc.wait(10)
        self._logfile.close()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self._logfile.closed:
            return  # stopped already (or killed)
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait(10)
        self._kill_group()  # anything of its group still there (a worker whose master has gone)
        self._logfile.close()


def start_registry(
    workdir: Path, access_log: bool = False, htpasswd: Path | None = None, proxy_of: str | None = None
) -> tuple[Service, str]:
    """CNCF Distribution (Debian ``docker-registry``) on a free loopback port, storing under ``workdir``. With
    ``access_log`` its log (``workdir/registry.log``) lists every request, for ``upstream_requests``; with
    ``htpasswd`` (bcrypt entries) every request needs Basic credentials; with ``proxy_of`` (a URL) it is a
    pull-through cache of that registry (Distribution's proxy mode, with its usual in-memory blob descriptor
    cache)."""
    binary = require("docker-registry")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "registry.yml"
    auth = f"auth:\n  htpasswd:\n    realm: upstream\n    path: {htpasswd}\n" if htpasswd else ""
    storage_cache = "  cache:\n    blobdescriptor: inmemory\n" if proxy_of else ""
    config.write_text(
        f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {str(not access_log).lower()}\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n  delete:\n    enabled: true\n"
        f"{storage_cache}http:\n  addr: 127.0.0.1:{port}\n{auth}"
        + (f"proxy:\n  remoteurl: {proxy_of}\n" if proxy_of else "")
    )
    service = Service([binary, "serve", str(config)], workdir / "registry.log")
    url = f"http://127.0.0.1:{port}"
    try:
        service.wait_ready(url + "/v2/", also=(401,) if htpasswd else ())
    except BaseException:
        service.stop()
        raise
    return service, url


def upstream_requests(registry_log: Path, method: str, path_part: str = "") -> int:
    """How many ``method`` requests whose path contains ``path_part`` Distribution's access log shows."""
    needle = f'"{method} '
    count = 0
    for line in registry_log.read_text(errors="replace").splitlines():
        start = line.find(needle)
        if start >= 0 and path_part in line[start : line.find(" HTTP/", start)]:
            count += 1
    return count


def start_nginx(
    workdir: Path,
    upstream: str,
    directives: str = "",
    locations: str = "",
    throttle: str = "",
    log: bool = False,
    http: str = "",
) -> tuple[Service, str]:
    """nginx as a reverse proxy in front of ``upstream``: ``directives`` go into its catch-all location (e.g.
    Docker Hub's ratelimit headers);
    ``locations`` are more ``location`` blocks (fault switches for one repository); ``throttle`` (``1m``) limits
    every download to that many bytes per second (nginx only throttles buffered proxying); with ``log`` every
    request is logged to ``workdir/logs/access.log`` as ``METHOD URI STATUS range=RANGE`` (``nginx_requests``);
    ``http`` goes into the ``http`` block (e.g. a ``limit_req_zone`` for ``directives`` to use)."""
    binary = require("nginx")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "tmp"):
        (workdir / sub).mkdir(exist_ok=True)
    config = workdir / "nginx.conf"
    config.write_text(
        f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 256; }}
http {{
  {NGINX_LOG_FORMAT + f"access_log {workdir}/logs/access.log ranges;" if log else "access_log off;"}
  client_body_temp_path {workdir}/tmp/body;
  proxy_temp_path {workdir}/tmp/proxy;
  fastcgi_temp_path {workdir}/tmp/fastcgi;
  uwsgi_temp_path {workdir}/tmp/uwsgi;
  scgi_temp_path {workdir}/tmp/scgi;
  {http}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      proxy_pass {upstream};
      {"proxy_buffering on; proxy_limit_rate " + throttle + "; limit_rate " + throttle + ";" if throttle else "proxy_buffering off;"}
      proxy_http_version 1.1;
      {directives}
    }}
    {locations}
  }}
}}
"""
    )
    service = Service([binary, "-p", str(workdir), "-c", str(config)], workdir / "nginx.log")
    url = f"http://127.0.0.1:{port}"
    service.wait_ready(url + "/v2/")
    return service, url


NGINX_LOG_FORMAT = "log_format ranges '$request_method $uri $status range=$http_range';"


def nginx_requests(workdir: Path, path_part: str, at_least: int = 0) -> list[tuple[str, int, str]]:
    """(method, status, Range header) of each request whose path contains ``path_part`` that the nginx started
    in ``workdir`` with ``log`` served. nginx writes a line once it is done with a request, which may be just
    after its client has the last byte: with ``at_least``, wait (up to 10 s) for that many lines."""
    if at_least:
        wait_until(lambda: len(nginx_requests(workdir, path_part)) >= at_least, 10, f"{at_least} lines in nginx's log")
    found = []
    for line in (workdir / "logs" / "access.log").read_text(errors="replace").splitlines():
        method, uri, status, rng = line.split(" ", 3)
        if path_part in uri:
            found.append((method, int(status), rng.removeprefix("range=")))
    return found


@contextlib.contextmanager
def throttled_upstream(work: Path, slow: str) -> Iterator[dict[str, Any]]:
    """A real Distribution (access log on) behind two nginx: ``herd`` at 8 MB/s and ``slow`` at ``slow`` (nginx's
    rate, e.g. ``1m``) with its request log in ``slow_dir`` (``nginx_requests``); ``url`` is Distribution itself."""
    registry, url = start_registry(work / "registry", access_log=True)
    herd_nginx, herd_url = start_nginx(work / "nginx-herd", url, throttle="8m")
    slow_nginx, slow_url = start_nginx(work / "nginx-slow", url, throttle=slow, log=True)
    try:
        yield {
            "log": work / "registry" / "registry.log",
            "herd": herd_url,
            "slow": slow_url,
            "slow_dir": work / "nginx-slow",
            "url": url,
        }
    finally:
        slow_nginx.stop()
        herd_nginx.stop()
        registry.stop()


COORDINATED = "tests.support.coordinated"  # the entry of mirrors that share one data dir (``Mirror(entry=...)``)

# An upstream that is not there: for tests that only push (a push never asks the upstream).
NO_UPSTREAM = "http://127.0.0.1:9"


class Mirror(Service):
    """``mirror serve`` as a subprocess, returned once ``/readyz`` answers; the one mirror launcher of the suite.

    ``listen`` defaults to a free loopback port; with ``--tls-cert`` among the flags it serves https and ``ca``
    (the certificate to trust) verifies it; ``host`` runs it inside that network namespace (``listen`` is then on
    ``host.ip``); ``wrap`` prefixes the command (a memory limit, ``strace``). ``log`` defaults to
    ``mirror-<listen>.log`` beside the data dir; ``entry`` is the module run (``COORDINATED``: fetches coordinated
    with the other mirrors on the data dir); ``env`` adds to its environment. As a context manager it is stopped
    on exit."""

    def __init__(
        self,
        data_dir: Path,
        upstream: str,
        *flags: str,
        log: Path | None = None,
        wrap: list[str] | None = None,
        listen: str | None = None,
        ca: Path | None = None,
        host: NamespaceHost | None = None,
        entry: str = "mirror",
        env: dict[str, str] | None = None,
    ):
        self.port = free_port() if listen is None else int(listen.rpartition(":")[2])
        listen = listen or f"127.0.0.1:{self.port}"
        scheme = "https" if "--tls-cert" in flags else "http"
        self.url = f"{scheme}://{listen}"
        self.data_dir = data_dir
        self.upstream = upstream
        self.context = ssl.create_default_context(cafile=str(ca)) if ca else None
        args = [
            sys.executable, "-m", entry, "serve", "--listen", listen,
            "--data-dir", str(data_dir), "--upstream", upstream, *flags,
        ]  # fmt: skip
        if host is not None:
            args = host.argv(*args)
        log = log or data_dir.parent / f"mirror-{listen.replace(':', '-')}.log"
        super().__init__([*(wrap or []), *args], log, env={**mirror_env(), **(env or {})})
        try:
            self.wait_ready(self.url + "/readyz", context=self.context)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def metrics(self) -> str:

        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())


def coordinated_mirrors(data_dir: Path, upstream: str, *flags: str, count: int = 2) -> list[Mirror]:
    """``count`` mirrors sharing ``data_dir`` (``COORDINATED``); stop each."""
    mirrors: list[Mirror] = []
    try:
        for _ in range(count):
            mirrors.append(Mirror(data_dir, upstream, *flags, entry=COORDINATED))
    except BaseException:
        for mirror in mirrors:
            mirror.stop()
        raise
    return mirrors


def mirror_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``mirror ARGS`` in its own process (as an operator runs it beside ``mirror serve``)."""

    result = subprocess.run(
        [sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=mirror_env(), timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mirror {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def record_figures(name: str, **values: Any) -> None:
    """Print figures a test measured (shown with ``pytest -s``); with MIRROR_FIGURES=FILE also append them there
    as one JSON line, for the notes of an issue."""
    line = json.dumps({"test": name, **values})
    print(f"figures: {line}")
    target = os.environ.get("MIRROR_FIGURES")
    if target:
        with open(target, "a") as fh:
            fh.write(line + "\n")
