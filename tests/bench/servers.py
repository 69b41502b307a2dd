"""The four servers on loopback: an upstream Distribution (with its access log, to count upstream GETs), the mirror
(a subprocess), Distribution in proxy mode at the same upstream with its own storage, and nginx serving the mirror's
data dir (``/blobs/sha256/xx/<hex>``: the cached file itself) with sendfile."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ops import REPO_ROOT, Mirror, Service, free_port, start_registry


def need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        raise SystemExit(f"bench: {binary} is not installed")
    return path


def start_proxy(workdir: Path, upstream: str) -> tuple[Service, str]:
    """CNCF Distribution in proxy mode (``proxy.remoteurl``) at ``upstream``, with its own filesystem storage."""
    binary = need("docker-registry")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "proxy.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n  cache:\n    blobdescriptor: inmemory\n"
        f"http:\n  addr: 127.0.0.1:{port}\nproxy:\n  remoteurl: {upstream}\n"
    )
    service = Service([binary, "serve", str(config)], workdir / "proxy.log")
    url = f"http://127.0.0.1:{port}"
    try:
        service.wait_ready(url + "/v2/")
    except BaseException:
        service.stop()
        raise
    return service, url


def start_static(workdir: Path, data_dir: Path) -> tuple[Service, str]:
    """nginx (one worker, sendfile on, no access log) serving ``data_dir`` read-only, and ``workdir/static`` (a
    1 KiB file, to show what the load client can do) under ``/static/``."""
    binary = need("nginx")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "tmp", "static"):
        (workdir / sub).mkdir(exist_ok=True)
    (workdir / "static" / "1k").write_bytes(os.urandom(1024))
    config = workdir / "nginx.conf"
    config.write_text(
        f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  client_body_temp_path {workdir}/tmp/body;
  proxy_temp_path {workdir}/tmp/proxy;
  fastcgi_temp_path {workdir}/tmp/fastcgi;
  uwsgi_temp_path {workdir}/tmp/uwsgi;
  scgi_temp_path {workdir}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    location /blobs/ {{ root {data_dir}; }}
    location /static/ {{ root {workdir}; }}
    location / {{ return 200 "ok"; }}
  }}
}}
"""
    )
    service = Service([binary, "-p", str(workdir), "-c", str(config)], workdir / "nginx.log")
    url = f"http://127.0.0.1:{port}"
    try:
        service.wait_ready(url + "/static/1k")
    except BaseException:
        service.stop()
        raise
    return service, url


@dataclass
class Servers:
    work: Path
    upstream: Service
    upstream_url: str
    mirror: Mirror
    proxy: Service
    proxy_url: str
    nginx: Service
    nginx_url: str
    mirror_flags: list[str] = field(default_factory=list)

    @property
    def upstream_log(self) -> Path:
        return self.work / "upstream" / "registry.log"

    def url(self, name: str) -> str:
        return {"mirror": self.mirror.url, "proxy": self.proxy_url, "upstream": self.upstream_url}[name]

    def pid(self, name: str) -> int:
        return {"mirror": self.mirror.proc.pid, "proxy": self.proxy.proc.pid}[name]

    def cpu_seconds(self, name: str) -> float:
        """User + system CPU time the server has used so far (nginx: its master and worker)."""
        service = {"mirror": self.mirror, "proxy": self.proxy, "upstream": self.upstream, "nginx": self.nginx}[name]
        pids = [service.proc.pid]
        if name == "nginx":
            pids += children(service.proc.pid)
        return sum(cpu_seconds(pid) for pid in pids)

    def nginx_blob_url(self, digest: str) -> str:
        algo, hexpart = digest.split(":", 1)
        return f"{self.nginx_url}/blobs/{algo}/{hexpart[:2]}/{hexpart}"

    def stop(self) -> None:
        for service in (self.nginx, self.proxy, self.mirror, self.upstream):
            with contextlib.suppress(Exception):
                service.stop()


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return found


def start_all(work: Path, mirror_flags: list[str]) -> Servers:
    """Start the four servers under ``work``; on a failure half-way, stop what was started."""
    need("docker-registry")
    need("nginx")
    started: list[Service] = []
    try:
        upstream, upstream_url = start_registry(work / "upstream", access_log=True)
        started.append(upstream)
        mirror = Mirror(work / "mirror", upstream_url, *mirror_flags, log=work / "mirror.log")
        started.append(mirror)
        proxy, proxy_url = start_proxy(work / "proxy", upstream_url)
        started.append(proxy)
        nginx, nginx_url = start_static(work / "nginx", work / "mirror")
        started.append(nginx)
    except BaseException:
        for service in reversed(started):
            with contextlib.suppress(Exception):
                service.stop()
        raise
    return Servers(work, upstream, upstream_url, mirror, proxy, proxy_url, nginx, nginx_url, list(mirror_flags))


def mirror_python() -> str:
    """The interpreter the mirror runs on (the bench's own, with ``PYTHONPATH`` at this checkout)."""
    return f"{sys.executable} (PYTHONPATH={REPO_ROOT})"
