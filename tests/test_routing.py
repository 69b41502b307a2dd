"""Routing policies with in-process upstreams: what a real registry cannot be made to show or count.

Allow/deny patterns, unknown registries (no outbound connection), the opt-in wildcard upstream, a static token,
the per-upstream connection limit, and serving known tags without revalidation while the pull quota is low.
The three dialects against real registries and real clients are in tests/integration/test_routing_clients.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mirror import routing as routing_module
from mirror.api.keys import ROUTING
from mirror.app import create_app
from mirror.config import Config, ConfigError, UpstreamConfig, build, load
from mirror.routing import MAX_WILDCARD_HOSTS
from tests.conftest import MirrorClient
from tests.fakes.registry import FakeRegistry, sha256

Upstream = tuple[FakeRegistry, TestServer]
MirrorOver = Callable[..., Awaitable[MirrorClient]]


@pytest.fixture
async def make_upstream(aiohttp_server: AiohttpServer) -> Callable[[], Awaitable[Upstream]]:
    async def make() -> Upstream:
        fake = FakeRegistry()
        return fake, await aiohttp_server(fake.app())

    return make


@pytest.fixture
def mirror_over(aiohttp_client: AiohttpClient, tmp_path: Path) -> MirrorOver:
    """``await mirror_over(UpstreamConfig(...), ...)``: a mirror with exactly these upstreams."""

    async def make(*upstreams: UpstreamConfig) -> MirrorClient:
        return await aiohttp_client(create_app(Config(data_dir=tmp_path / "data", upstreams=upstreams)))

    return make


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def host(server: TestServer) -> str:
    return f"{server.host}:{server.port}"


async def error(resp: ClientResponse) -> tuple[int, str, str]:
    body = await resp.json()
    return resp.status, body["errors"][0]["code"], body["errors"][0]["message"]


def sample(metrics: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


class ConnectionCounter:
    """A TCP listener that counts connections: where an upstream would be if the mirror fetched from it."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def listener() -> AsyncIterator[ConnectionCounter]:
    counter = ConnectionCounter()
    yield counter
    if counter.server is not None:
        counter.server.close()
        await counter.server.wait_closed()


# --- refusals ---------------------------------------------------------------------------------------------------
async def test_unknown_registry_is_refused_without_any_connection(
    make_upstream: Callable[[], Awaitable[Upstream]], mirror_over: MirrorOver, listener: ConnectionCounter
) -> None:
    fake, server = await make_upstream()
    mirror = await mirror_over(UpstreamConfig(registry="docker.io", url=url(server), default=True))
    elsewhere = await listener.start()
    for path in (
        f"/v2/team/app/manifests/1?ns={elsewhere}",
        f"/v2/{elsewhere}/team/app/manifests/1",
        f"/v2/team/app/blobs/sha256:{'a' * 64}?ns={elsewhere}",
        f"/v2/{elsewhere}/team/app/tags/list",
    ):
        status, code, message = await error(await mirror.get(path))
        assert (status, code) == (404, "NAME_UNKNOWN"), path
        assert elsewhere in message  # names the registry that is not configured
    assert listener.accepted == 0
    assert fake.requests == []


async def test_allow_and_deny_patterns_answer_denied_before_asking_upstream(
    make_upstream: Callable[[], Awaitable[Upstream]], mirror_over: MirrorOver
) -> None:
    fake, server = await make_upstream()
    fake.add_image("library/alpine", "3", [b"alpine"])
    fake.add_image("library/debian", "12", [b"debian"])
    fake.add_image("team/secret", "1", [b"secret"])
    mirror = await mirror_over(
        UpstreamConfig(
            registry="docker.io", url=url(server), default=True, allow=("library/*", "team/*"), deny=("team/secret*",)
        )
    )
    assert (await mirror.get("/v2/alpine/manifests/3")).status == 200
    assert (await mirror.get("/v2/library/debian/manifests/12")).status == 200
    seen = len(fake.requests)
    status, code, message = await error(await mirror.get("/v2/team/secret/manifests/1"))
    assert (status, code) == (403, "DENIED") and "denied" in message
    status, code, message = await error(await mirror.get("/v2/bitnami/redis/manifests/7"))
    assert (status, code) == (403, "DENIED") and "docker.io/bitnami/redis" in message
    assert len(fake.requests) == seen


# --- the wildcard upstream --------------------------------------------------------------------------------------
async def test_wildcard_upstream_reaches_only_allowed_hosts(
    make_upstream: Callable[[], Awaitable[Upstream]], mirror_over: MirrorOver, listener: ConnectionCounter
) -> None:
    hub, hub_server = await make_upstream()
    other, other_server = await make_upstream()
    digest = other.add_image("team/app", "1", [b"from the wildcard host"])
    elsewhere = await listener.start()
    mirror = await mirror_over(
        UpstreamConfig(registry="docker.io", url=url(hub_server), default=True),
        UpstreamConfig(registry="*", url="http://{registry}", allow_hosts=(host(other_server),)),
    )
    resp = await mirror.get(f"/v2/team/app/manifests/1?ns={host(other_server)}")
    assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == digest
    resp = await mirror.get(f"/v2/{host(other_server)}/team/app/manifests/{digest}")
    assert resp.status == 200
    status, code, _ = await error(await mirror.get(f"/v2/team/app/manifests/1?ns={elsewhere}"))
    assert (status, code) == (404, "NAME_UNKNOWN")
    assert listener.accepted == 0 and hub.requests == []
    metrics = await (await mirror.get("/metrics")).text()
    assert sample(metrics, "mirror_cache_requests_total", upstream=host(other_server), kind="tag", result="miss") == 1


def test_wildcard_upstream_needs_an_allowlist() -> None:
    with pytest.raises(ConfigError, match="allow_hosts"):
        build({}, [{"registry": "docker.io", "url": "https://registry-1.docker.io"}, {"registry": "*"}], {})
    config = build(
        {}, [{"registry": "*", "allow_hosts": ["*.corp.example"]}, {"registry": "docker.io", "url": "x"}], {}
    )
    assert config.default_upstream.registry == "docker.io"
    assert config.upstreams[0].url == "https://{registry}"


# --- credentials ------------------------------------------------------------------------------------------------
async def test_static_token_goes_to_the_upstream_only(
    make_upstream: Callable[[], Awaitable[Upstream]], mirror_over: MirrorOver, tmp_path: Path
) -> None:
    fake, server = await make_upstream()
    fake.faults.token_auth = True
    fake.faults.redirect_blobs = True  # blob GETs go to another origin, as Docker Hub's CDN
    layer = os.urandom(4096)
    fake.add_image("team/app", "1", [layer])
    token_file = tmp_path / "token"
    token_file.write_text("token-static\n")
    mirror = await mirror_over(
        UpstreamConfig(registry="docker.io", url=url(server), default=True, token_file=str(token_file))
    )
    assert (await mirror.get("/v2/team/app/manifests/1")).status == 200
    resp = await mirror.get(f"/v2/team/app/blobs/{sha256(layer)}")
    assert resp.status == 200 and await resp.read() == layer
    assert fake.tokens_issued == 0  # no handshake: the configured token was sent
    assert fake.storage_auth_headers == [None]  # and never to the other origin


# --- the connection limit ---------------------------------------------------------------------------------------
async def test_connection_limit_per_upstream(
    make_upstream: Callable[[], Awaitable[Upstream]], mirror_over: MirrorOver
) -> None:
    fake, server = await make_upstream()
    blobs = [fake.add_blob(os.urandom(1000)) for _ in range(6)]
    fake.faults.delay = 0.2
    mirror = await mirror_over(
        UpstreamConfig(registry="docker.io", url=url(server), default=True),
        UpstreamConfig(registry="limited.example", url=url(server), max_connections=2),
    )

    async def fetch_all(prefix: str, repo: str) -> None:
        resps = await asyncio.gather(*(mirror.get(f"/v2/{prefix}{repo}/blobs/{d}") for d in blobs))
        assert [r.status for r in resps] == [200] * len(blobs)

    await fetch_all("limited.example/", "team/a")
    assert fake.peak_active == 2
    fake.peak_active = 0
    await fetch_all("limited.example/", "team/a")
    assert fake.peak_active <= 1  # cache hits, nothing upstream
    blobs[:] = [fake.add_blob(os.urandom(1000)) for _ in range(6)]  # the default upstream has no limit
    await fetch_all("", "team/b")
    assert fake.peak_active == 6


# --- Docker Hub's pull limit ------------------------------------------------------------------------------------
async def test_low_quota_keeps_known_tags_without_revalidation(
    make_upstream: Callable[[], Awaitable[Upstream]], mirror_over: MirrorOver
) -> None:
    fake, server = await make_upstream()
    digest = fake.add_image("library/alpine", "3", [b"alpine"])
    fake.faults.ratelimit_remaining = 5
    mirror = await mirror_over(
        UpstreamConfig(
            registry="docker.io",
            url=url(server),
            default=True,
            tag_ttl=0.0,
            ratelimit_threshold=10,
            ratelimit_pause=0.5,
        )
    )
    assert (await mirror.get("/v2/alpine/manifests/3")).status == 200  # cold: fetched, quota seen low
    before = len(fake.requests)
    for _ in range(3):
        resp = await mirror.get("/v2/alpine/manifests/3")
        assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == digest
    assert len(fake.requests) == before  # tag TTL 0, yet no HEAD: the quota is being saved
    metrics = await (await mirror.get("/metrics")).text()
    assert sample(metrics, "mirror_ratelimit_deferred_total", upstream="docker.io", reason="low_quota") == 3

    fake.faults.ratelimit_remaining = 80
    await asyncio.sleep(0.6)  # the pause is a wall-clock window
    assert (await mirror.get("/v2/alpine/manifests/3")).status == 200
    assert (await mirror.get("/v2/alpine/manifests/3")).status == 200
    assert fake.count("HEAD", "manifests") == 2  # quota back: every request revalidates again (TTL 0)


async def test_after_a_429_known_tags_are_not_revalidated_until_retry_after(
    make_upstream: Callable[[], Awaitable[Upstream]], mirror_over: MirrorOver
) -> None:
    fake, server = await make_upstream()
    fake.add_image("library/alpine", "3", [b"alpine"])
    mirror = await mirror_over(UpstreamConfig(registry="docker.io", url=url(server), default=True, tag_ttl=0.0))
    assert (await mirror.get("/v2/alpine/manifests/3")).status == 200
    fake.faults.rate_limited = "3600"
    stale = await mirror.get("/v2/alpine/manifests/3")  # the HEAD gets the 429: served stale
    assert stale.status == 200 and stale.headers["X-Mirror-Stale"] == "true"
    asked = len(fake.requests)
    for _ in range(2):
        assert (await mirror.get("/v2/alpine/manifests/3")).status == 200
    assert len(fake.requests) == asked  # within Retry-After the upstream is not asked again
    status, code, _ = await error(await mirror.get("/v2/alpine/manifests/never-seen"))
    assert (status, code) == (429, "TOOMANYREQUESTS")  # unknown tags still go upstream and get the 429
    metrics = await (await mirror.get("/metrics")).text()
    assert sample(metrics, "mirror_ratelimit_deferred_total", upstream="docker.io", reason="rate_limited") == 2


def test_add_upstream_flag() -> None:
    config = build({"add_upstream": ["ghcr.io=https://ghcr.io", "quay.io=https://quay.io"]}, None, {})
    assert [(u.registry, u.url, u.default) for u in config.upstreams] == [
        ("docker.io", "https://registry-1.docker.io", True),
        ("ghcr.io", "https://ghcr.io", False),
        ("quay.io", "https://quay.io", False),
    ]
    with pytest.raises(ConfigError, match="REGISTRY=URL"):
        build({"add_upstream": ["ghcr.io"]}, None, {})


def test_the_readme_upstreams_example_is_a_valid_config(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = next(b.split("\n", 1)[1] for b in readme.split("```toml")[1:] if 'registry = "*"' in b).split("```")[0]
    (tmp_path / "mirror.toml").write_text(block)
    config = load({}, str(tmp_path / "mirror.toml"), environ={})
    by_name = {u.registry: u for u in config.upstreams}
    assert config.default_upstream.registry == "docker.io"
    assert by_name["ghcr.io"].allow == ("myorg/*",) and by_name["ghcr.io"].max_connections == 8
    assert by_name["*"].wildcard and by_name["*"].allow_hosts == ("*.corp.example", "quay.io")


# --- the wildcard host table: least recently used idle hosts make room -----------------------------------------
class PrefixUpstream:
    """One upstream for every wildcard host: the url template puts the host in the path (``/<host>/v2/...``).
    It answers 404 MANIFEST_UNKNOWN, after waiting for the host's gate if one is set."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}

    async def handle(self, request: web.Request) -> web.Response:
        registry = request.path.split("/")[1]
        self.hosts.append(registry)
        self.arrived.setdefault(registry, asyncio.Event()).set()
        if registry in self.gates:
            await self.gates[registry].wait()
        return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}, status=404)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture
async def prefix_mirror(aiohttp_server: AiohttpServer, mirror_over: MirrorOver) -> tuple[MirrorClient, PrefixUpstream]:
    upstream = PrefixUpstream()
    server = await aiohttp_server(upstream.app())
    mirror = await mirror_over(
        UpstreamConfig(registry="docker.io", url="http://127.0.0.1:9", default=True),
        UpstreamConfig(registry="*", url=f"{url(server)}/{{registry}}", allow_hosts=("*.test",)),
    )
    return mirror, upstream


async def test_wildcard_table_drops_the_least_recently_used_host(
    prefix_mirror: tuple[MirrorClient, PrefixUpstream],
) -> None:
    """300 distinct allowed hosts: every one reaches its upstream (the 300th too); the table stays at 256."""
    mirror, upstream = prefix_mirror
    routing = mirror.app[ROUTING]
    for i in range(300):
        resp = await mirror.get(f"/v2/team/app/manifests/1?ns=h{i}.test")
        assert (resp.status, (await resp.json())["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN"), i
        assert len(routing.wildcard_hosts) <= MAX_WILDCARD_HOSTS
    assert upstream.hosts[-1] == "h299.test" and len(set(upstream.hosts)) == 300
    assert routing.wildcard_hosts == [f"h{i}.test" for i in range(300 - MAX_WILDCARD_HOSTS, 300)]
    # A host used again becomes the most recent: it is not the next one dropped.
    await mirror.get(f"/v2/team/app/manifests/1?ns=h{300 - MAX_WILDCARD_HOSTS}.test")
    await mirror.get("/v2/team/app/manifests/1?ns=new.test")
    assert routing.wildcard_hosts[0] == f"h{302 - MAX_WILDCARD_HOSTS}.test"  # h{300 - MAX} was moved
    assert routing.wildcard_hosts[-2:] == [f"h{300 - MAX_WILDCARD_HOSTS}.test", "new.test"]


async def test_wildcard_table_keeps_hosts_in_use(
    prefix_mirror: tuple[MirrorClient, PrefixUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Table of 2: with both hosts' requests under way a third host gets 429; once one ends, it takes its place."""
    monkeypatch.setattr(routing_module, "MAX_WILDCARD_HOSTS", 2)
    mirror, upstream = prefix_mirror
    upstream.gates = {"a.test": asyncio.Event(), "b.test": asyncio.Event()}
    upstream.arrived = {"a.test": asyncio.Event(), "b.test": asyncio.Event()}
    pending = {h: asyncio.create_task(mirror.get(f"/v2/team/app/manifests/1?ns={h}")) for h in ("a.test", "b.test")}
    async with asyncio.timeout(10):  # both reached the upstream (a refused one never would)
        await upstream.arrived["a.test"].wait()
        await upstream.arrived["b.test"].wait()
    status, code, _ = await error(await mirror.get("/v2/team/app/manifests/1?ns=c.test"))
    assert (status, code) == (429, "TOOMANYREQUESTS")
    upstream.gates["b.test"].set()
    assert (await pending["b.test"]).status == 404
    assert (await mirror.get("/v2/team/app/manifests/1?ns=c.test")).status == 404
    assert mirror.app[ROUTING].wildcard_hosts == ["a.test", "c.test"]
    upstream.gates["a.test"].set()
    assert (await pending["a.test"]).status == 404
