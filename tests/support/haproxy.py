"""A real HAProxy (Debian's ``haproxy``) on loopback in front of mirror replicas, for the tests of a cluster behind
an ordinary load balancer.

The configuration is the deploy kit's (deploy/cluster/haproxy.cfg) with loopback addresses: round robin over the
replicas, a replica whose ``GET /readyz`` fails gets no new requests, ``/_mirror/`` (the replicas' internal
endpoints) denied to clients, inactivity timeouts long enough for a multi-GB layer, a refused connection retried on
another replica. For the tests it also logs every request to its output as soon as the replica's answer headers
are through (``option logasap``), with the replica that answered, the client's ``User-Agent`` and ``Range``:
``requests`` reads them back, so a test sees which replica answered what while a download is still running.

It runs in the foreground (``-db``) under ``Service`` and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.ops import Service, free_port, require

START_WITHIN = 30.0  # seconds; it answers within a few ms, the replicas' first checks take a moment

# A log line of ``option httplog`` with two captured request headers, e.g.
# 127.0.0.1:4242 [01/Dec/2026:18:50:00.123] registry mirrors/replica-1 0/0/0/2/+2 200 +123 - - ---- 1/1/0/0/0 0/0
#   {containerd/1.6.20|bytes=100-} "GET /v2/library/x/blobs/sha256:... HTTP/1.1"
_LINE = re.compile(
    r" registry (?P<backend>\S+)/(?P<server>\S+) \S+ (?P<status>-?\d+) .*"
    r"\{(?P<agent>[^|}]*)\|(?P<range>[^}]*)\} \"(?P<method>[A-Z]+) (?P<uri>\S+)"
)


@dataclass(frozen=True, slots=True)
class Request:
    """One request HAProxy passed on (or denied: ``server`` is ``<NOSRV>``)."""

    server: str
    status: int
    method: str
    uri: str
    agent: str
    range: str  # the client's Range header, "" when it sent none


def config(port: int, replicas: dict[str, str]) -> str:
    """HAProxy's configuration: ``port`` on 127.0.0.1 in front of ``replicas`` (name -> ``http://host:port``)."""
    servers = "\n".join(
        f"    server {name} {url.removeprefix('http://').rstrip('/')} check" for name, url in replicas.items()
    )
    return f"""global
    log stdout format raw local0
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    option logasap
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    timeout http-request 30s
    timeout http-keep-alive 60s
    timeout queue 30s
    retries 2
    option redispatch

frontend registry
    bind 127.0.0.1:{port}
    capture request header User-Agent len 64
    capture request header Range len 40
    http-request deny deny_status 404 if {{ path_beg /_mirror/ }}
    default_backend mirrors

backend mirrors
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{servers}
"""


@dataclass
class HAProxy:
    """A running HAProxy: clients use ``url``; ``requests`` is what it has passed on so far."""

    service: Service
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self, uri_part: str = "") -> list[Request]:
        found = []
        for line in self.service.log.read_text(errors="replace").splitlines():
            match = _LINE.search(line)
            if match and uri_part in match["uri"]:
                found.append(
                    Request(
                        match["server"], int(match["status"]), match["method"], match["uri"], match["agent"],
                        match["range"],
                    )
                )  # fmt: skip
        return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def haproxy(workdir: Path, replicas: dict[str, str]) -> Iterator[HAProxy]:
    """HAProxy in front of ``replicas`` (name -> URL); yields once as many requests in a row as there are
    replicas answer ``/readyz`` through it (round robin: each replica once), and stops it on exit."""
    binary = require("haproxy")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "haproxy.cfg"
    conf.write_text(config(port, replicas))
    service = Service([binary, "-f", str(conf), "-db"], workdir / "haproxy.log")
    proxy = HAProxy(service, port, workdir)
    try:
        deadline = time.monotonic() + START_WITHIN
        in_a_row = 0
        while in_a_row < len(replicas):
            if not service.alive():
                raise AssertionError(f"haproxy exited: {service.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy not passing to every replica within {START_WITHIN} s")
            if _answers(proxy.url + "/readyz"):
                in_a_row += 1
            else:
                in_a_row = 0
                time.sleep(0.05)  # HAProxy (another process) still starting: polled with a deadline
        yield proxy
    finally:
        service.stop()
