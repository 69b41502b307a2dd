"""Webhook notifications: Distribution's envelope on every manifest push and delete, delivered in the background
with retries, never holding up the push. The receiver is a small aiohttp server."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from mirror.config import NotificationsConfig
from mirror.metrics import Metrics
from mirror.notify import EVENTS_TYPE, Endpoint, Event, Notifier, RequestInfo
from tests.conftest import MirrorClient, MirrorFactory
from tests.support.credentials import make_htpasswd
from tests.support.plain_http import OCI_MANIFEST, sha256
from tests.support.pushing import push_image


@dataclass
class Receiver:
    events: list[dict[str, Any]] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    fail_first: int = 0  # answer 500 to this many requests
    hold: asyncio.Event | None = None  # when set, requests wait for it
    attempts: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.attempts <= self.fail_first:
            return web.Response(status=500)
        self.content_types.append(request.headers["Content-Type"])
        self.headers.append(dict(request.headers))
        self.events.extend((await request.json())["events"])
        self.arrived.set()
        return web.Response(status=200)

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(20):
            while len(self.events) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.events


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> Receiver:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server: TestServer = await aiohttp_server(app)
    receiver.url = str(server.make_url("/hook"))
    return receiver


def notifications(receiver: Receiver, **settings: Any) -> NotificationsConfig:
    return NotificationsConfig(urls=(receiver.url,), **{"backoff": 0.01, "attempts": 3, "timeout": 5.0, **settings})


async def test_push_and_delete_events(push_mirror: MirrorFactory, receiver: Receiver, tmp_path: Path) -> None:
    htpasswd = make_htpasswd(tmp_path / "htpasswd", ("alice", "pw"))
    auth = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode(), "User-Agent": "test-client/1"}
    client = await push_mirror(
        htpasswd=htpasswd, notifications=notifications(receiver, headers={"Authorization": "Bearer hook-secret"})
    )
    manifest = await push_image(client, "my/app", "1.0", [b"layer"], headers=auth)
    (push,) = await receiver.wait_for(1)
    assert receiver.content_types == [EVENTS_TYPE]
    assert receiver.headers[0]["Authorization"] == "Bearer hook-secret"
    assert push["action"] == "push"
    assert push["target"] == {
        "mediaType": OCI_MANIFEST,
        "size": len(manifest),
        "length": len(manifest),
        "digest": sha256(manifest),
        "repository": "my/app",
        "url": f"http://{client.server.host}:{client.server.port}/v2/my/app/manifests/{sha256(manifest)}",
        "tag": "1.0",
    }
    assert push["actor"] == {"name": "alice"}
    assert push["request"]["method"] == "PUT"
    assert push["request"]["useragent"] == "test-client/1"
    assert push["timestamp"].endswith("Z") and push["id"] and push["source"]["instanceID"]

    resp = await client.delete(f"/v2/my/app/manifests/{sha256(manifest)}", headers=auth)
    assert resp.status == 202
    _, delete = await receiver.wait_for(2)
    assert delete["action"] == "delete"
    assert delete["target"]["digest"] == sha256(manifest)
    assert "tag" not in delete["target"]


async def test_delivery_is_retried(push_mirror: MirrorFactory, receiver: Receiver) -> None:
    receiver.fail_first = 2
    client = await push_mirror(notifications=notifications(receiver, attempts=3))
    await push_image(client, "my/app", "1.0", [b"layer"])
    await drain(client)
    assert len(receiver.events) == 1
    assert _counter(client, "sent") == 1
    assert receiver.attempts == 3
    assert _counter(client, "retried") == 2


async def test_a_slow_receiver_never_holds_up_a_push(push_mirror: MirrorFactory, receiver: Receiver) -> None:
    receiver.hold = asyncio.Event()
    client = await push_mirror(notifications=notifications(receiver))
    async with asyncio.timeout(10):
        await push_image(client, "my/app", "1.0", [b"layer"])
        await push_image(client, "my/app", "2.0", [b"layer 2"])
    async with asyncio.timeout(10):
        await receiver.arrived.wait()  # the first event is being delivered, and still held
    assert receiver.events == []
    receiver.hold.set()
    events = await receiver.wait_for(2)
    assert [e["target"]["tag"] for e in events] == ["1.0", "2.0"]  # in order


async def test_undeliverable_events_are_counted_and_dropped(push_mirror: MirrorFactory, receiver: Receiver) -> None:
    receiver.fail_first = 1000
    client = await push_mirror(notifications=notifications(receiver, attempts=2))
    await push_image(client, "my/app", "1.0", [b"layer"])
    await drain(client)
    assert _counter(client, "failed") == 1
    assert receiver.attempts == 2
    assert _counter(client, "sent") == 0


async def test_a_full_queue_drops_the_oldest(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    monkeypatch.setattr("mirror.notify.QUEUE_SIZE", 2)
    receiver.hold = asyncio.Event()
    metrics = Metrics()
    notifier = Notifier([Endpoint(receiver.url, backoff=0.01)], metrics, "mirror:5000", "mirror-test")
    await notifier.start()
    try:
        info = RequestInfo("id", "127.0.0.1", "mirror:5000", "PUT", "test")
        event = [
            Event("push", "my/app", f"sha256:{i:064x}", OCI_MANIFEST, 1, str(i), None, "u", info) for i in range(4)
        ]
        notifier.publish(event[0])
        async with asyncio.timeout(10):
            await receiver.arrived.wait()  # the worker holds event 0
        for e in event[1:]:
            notifier.publish(e)  # 1, 2 queued; 3 pushes out 1
        receiver.hold.set()
        events = await receiver.wait_for(3)
        assert [e["target"]["tag"] for e in events] == ["0", "2", "3"]
        assert metrics.notifications.labels("dropped")._value.get() == 1
    finally:
        await notifier.close()


async def drain(client: MirrorClient) -> None:
    """Wait for the notifier to deliver (or give up on) everything queued."""
    from mirror.api.keys import NOTIFY

    async with asyncio.timeout(20):
        await client.app[NOTIFY].drain()


def _counter(client: MirrorClient, outcome: str) -> float:
    from mirror.api.keys import METRICS

    return float(client.app[METRICS].notifications.labels(outcome)._value.get())
