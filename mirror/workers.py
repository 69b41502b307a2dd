"""``mirror serve --workers N`` (N > 1): N processes serve one port on one data dir, supervised by gunicorn.

The master process (gunicorn's arbiter) holds the listening socket and runs no requests. Before it forks the
workers it does the start-up work that must happen once per data dir: clean leftover temp files, reconcile the
index and the usage table with the disk. Each worker then builds the whole application (``app.create_app``) with
fetches coordinated across processes (``Config.coordination = "files"``) and serves on aiohttp's gunicorn worker.

Signals, as gunicorn defines them: a worker that dies is replaced; SIGTERM stops accepting and lets requests in
flight finish (up to ``GRACEFUL_TIMEOUT``); SIGHUP reads the configuration again (flags, environment, the TOML
file, the htpasswd file) and replaces the workers one generation at a time, or, if the new configuration is
invalid, logs why and keeps the running one. Metrics are kept in prometheus-client's multiprocess mode, in a
directory made for this run and removed at exit, so ``/metrics`` answers for every worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.worker import GunicornUVLoopWebWorker, GunicornWebWorker
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from prometheus_client import multiprocess

from mirror import log as log_setup
from mirror.access import Htpasswd, HtpasswdError
from mirror.api.accept import FairSite
from mirror.api.access_log import AccessLogger
from mirror.backends import cluster_link, open_index, open_store, open_usage
from mirror.config import Config, ConfigError
from mirror.config.cluster import as_worker, cluster_config, worker_port
from mirror.housekeeping import reconcile_logged
from mirror.storage.blobs import BlobStore
from mirror.storage.fetchlocks import FetchLocks
from mirror.storage.index import Index
from mirror.storage.usage import Usage

log = logging.getLogger(__name__)
GRACEFUL_TIMEOUT = 30  # seconds SIGTERM (or a reload) gives requests in flight before a worker is killed
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable for its multiprocess mode


class Log(glogging.Logger):
    """gunicorn's own lines (workers started, died, replaced) go through the mirror's log handlers, so they are
    text or JSON like every other line; the access log is the mirror's (``AccessLogger``), not gunicorn's."""

    def setup(self, cfg: Any) -> None:
        self.error_log = logging.getLogger(__name__)
        self.access_log.handlers[:] = []
        self.access_log.propagate = False


def check(config: Config) -> None:
    """Refuse, in the master, what would make every worker fail to boot."""
    from mirror.app import tls_context  # the composition root builds on this module's callers, not the reverse

    config.host_port  # noqa: B018 - validates --listen
    tls_context(config)
    if cluster_config(config).enabled and worker_port(config, slots(config) - 1) > 65535:
        raise ConfigError(
            f"[cluster] advertise: its port + 1 .. + {slots(config)} are the workers' own ports, past 65535"
        )
    if config.htpasswd:
        try:
            Htpasswd(config.htpasswd)
        except HtpasswdError as exc:
            raise ConfigError(str(exc)) from exc


def prepare(config: Config) -> None:
    """The once-per-start work on the data dir, before any worker runs: every temp file is a leftover now."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if cluster_config(config).enabled:
        prepare_replicas(config)
        return
    store = BlobStore(config.data_dir)
    FetchLocks(store).clean_sync()
    index, usage = Index(config.data_dir), Usage(config.data_dir)
    try:
        reconcile_logged(store, index, usage)
    finally:
        index.close()  # no SQLite connection may cross the fork
        usage.close()


def prepare_replicas(config: Config) -> None:
    """``prepare`` for the workers of a cluster replica: each worker's own temp files are leftovers, and the
    shared index is reconciled with the bucket once, as a replica of one process does at its start."""
    workers = config.data_dir / "workers"
    for own in sorted(workers.iterdir()) if workers.is_dir() else ():
        if own.is_dir():
            BlobStore(own).clean_tmp()
    link = cluster_link(config)
    assert link is not None
    store, _, bucket = open_store(config)
    index, usage = open_index(config, link), open_usage(config, link, serving=False)

    async def close() -> None:
        if bucket is not None:
            await bucket.close()
        await link.close()

    try:
        reconcile_logged(store, index, usage)
    finally:
        index.close()
        usage.close()
        asyncio.run(close())


def slots(config: Config) -> int:
    """The slots of a cluster replica's workers: two per worker, so that during a reload the new generation takes
    free ones at once while the old one drains (the other half), instead of waiting for it to let go."""
    return 2 * config.workers


async def claim_slot(config: Config, within: float = GRACEFUL_TIMEOUT + 10) -> tuple[int, socket.socket]:
    """The first slot whose own port (``cluster.worker_port``) is free, bound and listening: a worker of a cluster
    replica holds its slot (and so its directory under ``<data-dir>/workers``) for as long as it lives, and the
    kernel frees it when it dies; the one that replaces it takes it again. Only with every slot held (a reload
    while the one before still drains) does a worker wait."""
    host, _ = config.host_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + within
    while True:
        for slot in range(slots(config)):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a dead worker's port, past its TIME_WAIT
            try:
                sock.bind((host, worker_port(config, slot)))
            except OSError:
                sock.close()
                continue
            sock.listen(1024)
            sock.setblocking(False)
            return slot, sock
        if time.monotonic() > deadline:
            ports = f"{worker_port(config, 0)}-{worker_port(config, slots(config) - 1)}"
            raise RuntimeError(f"no worker port free on {host} ({ports}): each worker of a replica listens on one")
        await asyncio.sleep(0.5)


class WorkerRunner(web.AppRunner):
    """The app runner of one worker; ``own`` is the listening socket of its own port (a cluster replica's worker),
    served beside the shared one."""

    def __init__(self, app: web.Application, own: socket.socket | None, **kwargs: Any):
        super().__init__(app, **kwargs)
        self.own = own


class Supervisor(BaseApplication):
    """gunicorn, configured from the mirror's Config; ``reread`` builds a fresh Config (for SIGHUP)."""

    def __init__(self, config: Config, reread: Callable[[], Config]):
        self.config = config
        self.reread = reread
        self._loop_id = secrets.token_hex(8)  # one for all workers: a request one of them sent is a loop to all
        super().__init__()

    def load_config(self) -> None:
        config = self.config
        host, port = config.host_port
        settings: dict[str, Any] = {
            "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "workers": config.workers,
            "worker_class": UVLoopWorker if config.uvloop else Worker,
            "graceful_timeout": GRACEFUL_TIMEOUT,
            "timeout": 60,  # a worker whose event loop is stuck this long is killed and replaced
            "logger_class": Log,
            "proc_name": "mirror",
            "child_exit": worker_exited,
            "certfile": str(config.tls_cert) if config.tls_cert else None,
            "keyfile": str(config.tls_key) if config.tls_key else None,
        }
        if "control_socket_disable" in self.cfg.settings:  # gunicorn 25+: no control socket in the user's home
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Callable[[], Any]:  # type: ignore[override]  # aiohttp's worker takes an async factory
        # On a data dir the workers coordinate through its files; in a cluster each worker is a replica.
        replicas = cluster_config(self.config).enabled
        config = self.config if replicas else dataclasses.replace(self.config, coordination="files")
        loop_id = self._loop_id

        async def runner() -> web.AppRunner:
            from mirror.app import create_app

            own = None
            served = config
            if replicas:
                slot, own = await claim_slot(config)
                served = as_worker(config, slot)
                log.info("worker %d of this replica: advertised as %s", slot, cluster_config(served).advertise)
            app = create_app(served, reconcile=False, loop_id=loop_id)
            return WorkerRunner(app, own, access_log_class=AccessLogger, shutdown_timeout=GRACEFUL_TIMEOUT * 0.9)

        return runner

    def run(self) -> None:
        Reloading(self).run()


class Worker(GunicornWebWorker):
    """aiohttp's gunicorn worker, serving each listening socket with ``FairSite`` (one accept per wake-up, so a
    burst of connections spreads over the workers instead of landing on the first one awake)."""

    async def _run(self) -> None:
        factory = cast(Callable[[], Awaitable[web.AppRunner]], self.wsgi)  # Supervisor.load's
        runner = await factory()
        await runner.setup()
        ssl = self._create_ssl_context(self.cfg) if self.cfg.is_ssl else None
        for sock in self.sockets:
            await FairSite(runner, sock, ssl_context=ssl).start()
        if isinstance(runner, WorkerRunner) and runner.own is not None:
            await FairSite(runner, runner.own, ssl_context=ssl).start()
        self.booted = True  # tells the arbiter it serves (a failure before this is a boot error)
        while self.alive and self.ppid == os.getppid():  # a worker whose master died stops
            self.notify()  # the arbiter's heartbeat: a worker silent for ``timeout`` is replaced
            await self._wait_next_notify()
        await runner.cleanup()  # stops accepting, lets requests in flight finish (shutdown_timeout)


class UVLoopWorker(Worker, GunicornUVLoopWebWorker):
    """``Worker`` on uvloop (``--uvloop``)."""


class Reloading(Arbiter):
    """gunicorn's arbiter, but SIGHUP first reads and checks the configuration in the master: a configuration
    that does not load (a broken TOML or htpasswd file) is refused with a log line and the workers keep running,
    where gunicorn alone would start new workers that fail to boot, and then stop."""

    app: Supervisor

    def reload(self) -> None:
        try:
            config = self.app.reread()
            check(config)
            if config.data_dir != self.app.config.data_dir:
                raise ConfigError(f"the data dir cannot change without a restart ({self.app.config.data_dir})")
        except ConfigError as exc:
            log.error("reload refused, the running configuration and workers stay: %s", exc)
            return
        log_setup.setup(config.log_level, config.log_format, pid=True)
        self.app.config = config
        log.info("configuration read again; replacing the workers")
        super().reload()


def worker_exited(server: object, worker: Any) -> None:
    """A worker ended (stopped or died): its live gauges leave the host's figures; its counters stay."""
    if os.environ.get(METRICS_ENV):
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def run(config: Config, reread: Callable[[], Config]) -> None:
    """Serve with ``config.workers`` processes until SIGTERM or SIGINT."""
    check(config)
    log_setup.setup(config.log_level, config.log_format, pid=True)
    prepare(config)
    metrics_dir = tempfile.mkdtemp(prefix="mirror-metrics-")
    os.environ[METRICS_ENV] = metrics_dir
    scheme = "https" if config.tls_cert else "http"
    host, port = config.host_port
    log.info("listening on %s://%s:%d with %d workers", scheme, host, port, config.workers)
    master = os.getpid()
    try:
        Supervisor(config, reread).run()
    finally:
        # A worker ends by raising SystemExit through this frame too (it was forked inside ``run``): only the
        # master may remove the directory the other workers still write to.
        if os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
