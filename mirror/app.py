"""The composition root: ``create_app(config)`` builds every object and owns their lifecycles."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from mirror import log as log_setup
from mirror.access import Access, AccessSettings, Htpasswd, HtpasswdError
from mirror.api import ui
from mirror.api.access import check_access
from mirror.api.access_log import AccessLogger
from mirror.api.admin import ADMIN, CLUSTER, READY
from mirror.api.forward import FORWARDING
from mirror.api.keys import (
    ACCESS,
    BUCKET,
    CLIENTS,
    LOCAL,
    METRICS,
    NOTIFY,
    PULL,
    REDIRECT,
    RESOLVE,
    ROUTING,
    STORE,
    USAGE,
)
from mirror.api.middleware import add_api_version, local_names, refuse_loops, registry_errors, request_metrics
from mirror.api.peer import PEERING
from mirror.api.routes import add_routes
from mirror.api.streaming import SENDER, Sender
from mirror.api.ui import actions
from mirror.backends import (
    cluster_coordination,
    cluster_link,
    coordination,
    membership,
    name_changes,
    open_index,
    open_store,
    open_usage,
    ref_locking,
    webhook_queues,
)
from mirror.config import Config, ConfigError
from mirror.config.access import access_rules
from mirror.config.storage import storage_config
from mirror.housekeeping import build_housekeeping, reconcile_logged
from mirror.metrics import Metrics
from mirror.notify import Endpoint, Notifier
from mirror.oci.reference import LOCAL as LOCAL_REGISTRY
from mirror.oci.reference import canonical_registry
from mirror.permissions import Permissions, Rule
from mirror.pull.service import PullThrough
from mirror.push.registry import LocalRegistry
from mirror.push.rules import PushRule
from mirror.push.uploads import Uploads
from mirror.routing import Router
from mirror.storage.base import BlobStorage, RegistryIndex, StoreUnavailable
from mirror.storage.counter import ChangeCounter
from mirror.storage.housekeeper import Housekeeper
from mirror.storage.sessions import UploadSessions
from mirror.storage.usage import Usage
from mirror.upstreams import USER_AGENT, build_upstreams

if TYPE_CHECKING:
    from mirror.storage.cluster import RedisLink

log = logging.getLogger(__name__)


def build_local(
    config: Config,
    store: BlobStorage,
    index: RegistryIndex,
    usage: Usage,
    metrics: Metrics,
    router: Router,
    changes: ChangeCounter | None,
) -> LocalRegistry:
    if LOCAL_REGISTRY in router.upstreams:
        raise ConfigError(f"{LOCAL_REGISTRY!r} names pushed content; no upstream may be called that")
    sessions = UploadSessions(
        config.data_dir,
        store,
        config.upload_max_sessions,
        config.upload_max_sessions_per_client,
        shared=config.coordination == "files",  # other processes take requests of the same sessions
    )
    metrics.upload_sessions.source = sessions.count_sync
    uploads = Uploads(store, sessions, metrics)
    return LocalRegistry(store, index, uploads, PushRule(config.push_prefixes), router.upstream, usage, changes=changes)


def build_access(config: Config, metrics: Metrics) -> Access:
    try:
        htpasswd = Htpasswd(config.htpasswd) if config.htpasswd else None
    except HtpasswdError as exc:
        raise ConfigError(str(exc)) from exc
    settings = AccessSettings(config.anonymous_pull, config.anonymous_push, config.read_only)
    rules = [Rule.of(r.users, r.repositories, r.actions) for r in access_rules(config)]
    permissions = Permissions(rules, config.anonymous_pull) if rules else None  # None: the built-in policy
    return Access(settings, htpasswd, metrics, permissions)


def build_notifier(config: Config, metrics: Metrics, link: RedisLink | None) -> Notifier:
    n = config.notifications
    endpoints = [Endpoint(url, n.headers, n.timeout, n.attempts, n.backoff) for url in n.urls]
    source = f"{socket.gethostname()}:{config.host_port[1]}"  # as Distribution reports its own address
    return Notifier(endpoints, metrics, source_addr=source, user_agent=USER_AGENT, queues=webhook_queues(link))


def push_lifecycle(config: Config, local: LocalRegistry) -> Callable[[web.Application], AsyncIterator[None]]:
    """Start-up: read the local repositories, remove abandoned upload sessions; then sweep sessions periodically.
    Shutdown: stop that; open sessions stay on disk and resume after a restart."""
    max_age = config.upload_max_age

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(min(max(max_age / 2, 1.0), 3600.0))
            await local.uploads.sessions.sweep(max_age)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        try:
            await asyncio.to_thread(local.load)
        except StoreUnavailable as exc:  # a cluster's Redis down at start-up: /readyz says so meanwhile
            log.warning("start-up: the local repositories' names cannot be read: %s", exc)
        await local.uploads.sessions.sweep(max_age)
        tasks = [asyncio.create_task(sweep_forever(), name="upload sweeper")]
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        local.uploads.sessions.close()

    return lifecycle


def create_app(config: Config, reconcile: bool = True, loop_id: str = "") -> web.Application:
    """The whole mirror over ``config``. ``reconcile``: match the index with the disk at start-up (a worker of
    ``mirror.workers`` skips it: its master did it once); ``loop_id`` marks the upstream requests of every process
    serving this mirror (default: one of its own)."""
    log_setup.quiet_parser_errors()  # one rate-limited line per malformed request, not a traceback each
    metrics = Metrics()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store, files, bucket = open_store(config)
    link = cluster_link(config)  # None for one node; with [cluster], the replicas' shared Redis
    index = open_index(config, link)
    loop_id = loop_id or secrets.token_hex(8)  # marks this mirror's upstream requests: one that comes back is a loop
    clients, policies, registries = build_upstreams(config, metrics, loop_id, link)
    metrics.prime(clients)
    usage = open_usage(config, link)
    inflight, clean_tmp = coordination(config, files)
    peering = None
    if link is not None and bucket is not None:  # replicas: one upstream fetch per digest for the cluster
        inflight, peering, forwarding = cluster_coordination(config, link, bucket, metrics)
    # Sharing the data dir, or a cluster: manifest and tag requests are made once for all its processes too.
    ref_locks = ref_locking(config, files, link)
    pull = PullThrough(
        store, index, clients, policies, metrics, usage=usage, cache_size=config.cache_size, inflight=inflight,
        ref_locks=ref_locks,
    )  # fmt: skip
    housekeeper, admin = build_housekeeping(config, store, index, usage, pull, metrics, registries.default, link)

    router = Router(registries)
    # Several processes on the data dir, or replicas: a push through one makes its name local for all.
    changes = name_changes(config, link)
    local = build_local(config, store, index, usage, metrics, router, changes)
    router.local = local.local  # pushed repositories take precedence over routing
    # Upload sessions count against the cache's size; when it is over, idle ones go before cached content.
    local.uploads.sessions.on_held = usage.uploads_held
    housekeeper.reclaim = lambda: local.uploads.sessions.sweep(config.upload_idle_when_full)

    shared = [local_names] if changes is not None else []
    app = web.Application(middlewares=[request_metrics, registry_errors, refuse_loops(loop_id), *shared, check_access])
    app[METRICS] = metrics
    app.cleanup_ctx.append(metrics.lifecycle)
    app[PULL] = pull
    app[STORE] = store
    app[BUCKET], app[REDIRECT] = bucket, storage_config(config).redirect
    app[SENDER] = sender = Sender()
    app.cleanup_ctx.append(sender.lifecycle)
    app[RESOLVE] = router.resolve
    app[ROUTING] = registries
    app[CLIENTS] = clients
    app[LOCAL] = local
    app[ACCESS] = access = build_access(config, metrics)
    app[NOTIFY] = notifier = build_notifier(config, metrics, link)  # with [cluster], the events wait in Redis
    app.cleanup_ctx.append(push_lifecycle(config, local))
    app[USAGE] = usage
    app[ADMIN] = admin
    app[READY] = lambda: readiness(config, store, index, housekeeper, link)
    if peering is not None:
        app[PEERING], app[FORWARDING] = peering, forwarding
    add_routes(app.router, config.admin_api, config.ui, cluster=peering is not None)
    if config.ui:
        ui.setup(app, ui_settings(config))
        if config.admin_api:
            actions.setup(app)
    app.on_response_prepare.append(add_api_version)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(clean_tmp)
        if bucket is not None:
            await asyncio.to_thread(bucket.load_tier_sync)
        report = await asyncio.to_thread(reconcile_logged, store, index, usage) if reconcile else None
        await housekeeper.start((report.table, report.generation) if report is not None else None)
        log.info(
            "serving the cache in %s; upstreams: %s",
            config.data_dir,
            ", ".join(f"{u.registry}={u.url}" + (" (default)" if u.default else "") for u in config.upstreams),
        )
        yield
        await pull.close()
        await housekeeper.close()
        for client in clients.values():
            await client.close()
        index.close()
        usage.close()
        if bucket is not None:
            await bucket.close()
        if link is not None:
            await link.close()
        access.close()  # the bcrypt threads

    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(notifier.lifecycle)  # after the lifecycle above: it stops before the link closes
    if changes is not None:  # after the lifecycle above: it stops reading before the link closes
        app.cleanup_ctx.append(changes.lifecycle)
    app[CLUSTER] = None
    if link is not None:  # after the lifecycle above: at shutdown the replica leaves before the link closes
        members_lifecycle, app[CLUSTER] = membership(config, link, inflight)
        app.cleanup_ctx.append(members_lifecycle)
    return app


def ui_settings(config: Config) -> ui.Settings:
    """What the web page shows of the configuration: the upstreams and how names reach them, the actions."""
    routes = tuple(
        ui.UpstreamRoute("*" if u.wildcard else canonical_registry(u.registry), u.url, u.default, u.allow_hosts)
        for u in config.upstreams
    )
    return ui.Settings(config.admin_api, canonical_registry(config.default_upstream.registry), routes)


def tls_context(config: Config) -> ssl.SSLContext | None:
    """``--tls-cert``/``--tls-key``: HTTPS, so that Docker talks to the mirror without ``insecure-registries``."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load --tls-cert {config.tls_cert} / --tls-key {config.tls_key}: {exc}") from exc
    return context


def run(config: Config, reread: Callable[[], Config] | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM), then close every upstream session and the index. With
    ``config.workers`` > 1, gunicorn supervises that many processes (``mirror.workers``; ``reread`` builds the
    configuration again on SIGHUP)."""
    if config.workers > 1:
        from mirror import workers  # gunicorn is imported only when it is used

        workers.run(config, reread or (lambda: config))
        return
    host, port = config.host_port
    context = tls_context(config)
    scheme = "https" if context else "http"
    web.run_app(
        create_app(config),
        host=host,
        port=port,
        ssl_context=context,
        access_log_class=AccessLogger,
        print=lambda _: log.info("listening on %s://%s:%d", scheme, host, port),
    )


async def readiness(
    config: Config, store: BlobStorage, index: RegistryIndex, housekeeper: Housekeeper, link: RedisLink | None = None
) -> str | None:
    """None when ready, else why not: the data dir must take a write, the index a read, and in a cluster Redis
    must answer (a load balancer then sends the traffic to the replicas that can serve it)."""
    if not housekeeper.ready:
        return "starting"
    if link is not None:
        try:
            await link.ping()
        except StoreUnavailable as e:
            return str(e)

    def check() -> str | None:
        try:
            store.probe_sync()
        except OSError as exc:
            return f"data dir {config.data_dir} is not writable: {exc.strerror}"
        try:
            index.healthy_sync()
        except Exception as exc:
            return f"index unreadable: {exc}"
        return None

    return await asyncio.to_thread(check)
