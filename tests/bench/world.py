"""The benchmark's world on loopback: an upstream Distribution, the mirror, Distribution in proxy mode in front of
the same upstream, and nginx serving files with sendfile; and content pushed to the upstream (random bytes, so
nothing compresses and no cache can cheat)."""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tests.support.ops import Mirror, Service, free_port, require, start_registry
from tests.support.plain_http import push_blob

MiB = 1 << 20
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class World:
    root: Path
    upstream: Service
    upstream_url: str
    mirror: Mirror
    proxy: Service
    proxy_url: str
    mirror_flags: list[str]
    nginx: Service | None = None
    nginx_url: str = ""

    def stop(self) -> None:
        for service in (self.nginx, self.mirror, self.proxy, self.upstream):
            if service is not None:
                service.stop()


def start_world(root: Path, mirror_flags: list[str]) -> World:
    root.mkdir(parents=True, exist_ok=True)
    upstream, upstream_url = start_registry(root / "upstream", access_log=True)
    proxy, proxy_url = start_registry(root / "proxy", proxy_of=upstream_url)
    mirror = Mirror(
        root / "mirror-data", upstream_url, "--log-level", "warning", *mirror_flags, log=root / "mirror.log"
    )
    say(f"upstream {upstream_url}, mirror {mirror.url} ({' '.join(mirror_flags) or 'defaults'}), proxy {proxy_url}")
    return World(root, upstream, upstream_url, mirror, proxy, proxy_url, mirror_flags)


def start_static_nginx(world: World, files: dict[str, Path]) -> None:
    """nginx (all cores, sendfile on) serving each file at ``/<name>``: the practical limit of this machine."""
    binary = require("nginx")
    workdir = world.root / "nginx"
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    port = free_port()
    locations = "\n".join(f"    location = /{name} {{ alias {path}; }}" for name, path in files.items())
    (workdir / "nginx.conf").write_text(
        f"""daemon off;
worker_processes auto;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  server {{
    listen 127.0.0.1:{port};
{locations}
    location = /v2/ {{ return 200 "{{}}"; }}
  }}
}}
"""
    )
    world.nginx = Service([binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf")], workdir / "nginx.log")
    world.nginx_url = f"http://127.0.0.1:{port}"
    world.nginx.wait_ready(world.nginx_url + "/v2/")


# --- content --------------------------------------------------------------------------------------------------
def _connection(url: str) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=600, blocksize=MiB)


def _request(
    url: str, method: str, path: str, body: bytes | BinaryIO | None = None, headers: dict[str, str] | None = None
) -> str:
    conn = _connection(url)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status}")
        return resp.headers.get("Location", "")
    finally:
        conn.close()


def push_random_blob(registry: str, repo: str, size: int, scratch: Path) -> str:
    """A blob of ``size`` random bytes, written to a scratch file while hashed, then uploaded from it in one PUT:
    never more than a MiB in memory, whatever the size."""
    digest = hashlib.sha256()
    path = scratch / f"blob-{os.getpid()}-{size}"
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            digest.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    name = "sha256:" + digest.hexdigest()
    location = _request(registry, "POST", f"/v2/{repo}/blobs/uploads/")
    target = urllib.parse.urlsplit(location)
    query = (target.query + "&" if target.query else "") + f"digest={name}"
    with open(path, "rb") as fh:
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        _request(registry, "PUT", f"{target.path}?{query}", fh, headers)
    path.unlink()
    return name


def push_manifest(registry: str, repo: str, ref: str, media_type: str, body: bytes) -> str:
    _request(registry, "PUT", f"/v2/{repo}/manifests/{ref}", body, {"Content-Type": media_type})
    return "sha256:" + hashlib.sha256(body).hexdigest()


def push_small_image(registry: str, repo: str, scratch: Path) -> tuple[str, str]:
    """An image of one 1 KiB layer, tagged ``v1``: (the manifest's digest, the layer's digest)."""
    layer = push_random_blob(registry, repo, 1024, scratch)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    config_digest = push_blob(registry, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": DOCKER_LAYER, "digest": layer, "size": 1024}],
    }).encode()  # fmt: skip
    return push_manifest(registry, repo, "v1", DOCKER_MANIFEST, manifest), layer


# --- what was compared ----------------------------------------------------------------------------------------
def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr).strip() else "?"


def versions() -> dict[str, str]:
    import aiohttp

    found = {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "docker-registry": _first_line(["docker-registry", "--version"]),
        "nginx": _first_line(["nginx", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
        "curl": _first_line(["curl", "--version"]),
        "skopeo": _first_line(["skopeo", "--version"]),
        "kernel": platform.release(),
    }
    try:
        found["uvloop"] = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        found["uvloop"] = "not installed"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    found["mirror"] = head.stdout.strip() or "?"
    return found


def machine() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return {"cores": os.cpu_count(), "cpu": model, "load_at_start": [round(x, 2) for x in load]}


def dumps(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
