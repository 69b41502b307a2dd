"""The composition root: ``create_app(config)`` builds every object and owns their lifecycles."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from mirror.api.access_log import AccessLogger
from mirror.api.keys import METRICS, PULL, RESOLVE
from mirror.api.middleware import add_api_version, registry_errors, request_metrics
from mirror.api.routes import add_routes
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.oci.reference import Repo, canonical_registry, route
from mirror.pullthrough import PullThrough, TagPolicy
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index
from mirror.upstream.auth import Credentials
from mirror.upstream.client import UpstreamClient, UpstreamSettings

log = logging.getLogger(__name__)
USER_AGENT = "mirror/0.1 (+pull-through registry cache)"


class Registries:
    """The configured upstreams as routing sees them: their names and which one is the default."""

    def __init__(self, names: list[str], default: str):
        self._names = frozenset(names)
        self._default = default

    def __contains__(self, registry: object) -> bool:
        return registry in self._names

    @property
    def default(self) -> str:
        return self._default


def build_upstreams(config: Config, metrics: Metrics) -> tuple[dict[str, UpstreamClient], dict[str, TagPolicy]]:
    clients: dict[str, UpstreamClient] = {}
    policies: dict[str, TagPolicy] = {}
    for upstream in config.upstreams:
        registry = canonical_registry(upstream.registry)
        secret = upstream.secret()
        credentials = Credentials(upstream.username, secret) if upstream.username and secret is not None else None
        settings = UpstreamSettings(
            registry=registry,
            url=upstream.url,
            credentials=credentials,
            timeout=upstream.timeout,
            user_agent=USER_AGENT,
        )
        clients[registry] = UpstreamClient(settings, metrics)
        policies[registry] = TagPolicy(upstream.tag_ttl, upstream.max_stale, upstream.timeout)
    return clients, policies


def create_app(config: Config) -> web.Application:
    metrics = Metrics()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = BlobStore(config.data_dir)
    index = Index(config.data_dir)
    clients, policies = build_upstreams(config, metrics)
    registries = Registries(list(clients), canonical_registry(config.default_upstream.registry))
    pull = PullThrough(store, index, clients, policies, metrics)

    def resolve(name: str, ns: str | None) -> Repo:
        return route(name, ns, registries)

    app = web.Application(middlewares=[request_metrics, registry_errors])
    app[METRICS] = metrics
    app[PULL] = pull
    app[RESOLVE] = resolve
    add_routes(app.router)
    app.on_response_prepare.append(add_api_version)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(store.clean_tmp)
        log.info(
            "serving the cache in %s; upstreams: %s",
            config.data_dir,
            ", ".join(f"{u.registry}={u.url}" + (" (default)" if u.default else "") for u in config.upstreams),
        )
        yield
        await pull.close()
        for client in clients.values():
            await client.close()
        index.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def run(config: Config) -> None:
    """Serve until interrupted (SIGINT/SIGTERM), then close every upstream session and the index."""
    host, port = config.host_port
    web.run_app(
        create_app(config),
        host=host,
        port=port,
        access_log_class=AccessLogger,
        print=lambda _: log.info("listening on http://%s:%d", host, port),
    )
