"""A real Redis (Debian's ``redis-server``) on loopback, for the tests of what replicas share.

One throwaway instance per test module: no persistence (``--save ''``, no AOF), a port of its own, stopped by its
PID. ``restart`` stops it and starts it again on the same port, empty, for the tests of a Redis restart under
traffic.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.ops import free_port, require

START_WITHIN = 20.0  # seconds; it is up in a few ms on an idle machine


def _answers(port: int) -> bool:
    """Whether a Redis answers PING on ``port`` (RESP, by hand: no client library needed to wait for it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(slots=True)
class RedisServer:
    """One ``redis-server`` under ``workdir``; ``url`` is what ``[cluster] redis_url`` takes."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = require("redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*args, "--dir", str(self.workdir)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + START_WITHIN
        while not _answers(self.port):
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server not answering within {START_WITHIN} s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop it (SIGKILL: everything in it is lost, as with no persistence) and start it on the same port."""
        self.stop()
        self.start()


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", name="redis_server")
def redis_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis per test module (import ``redis_fixture`` to use it); tests that share it use keys of their own
    or flush it."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server
