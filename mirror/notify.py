"""Webhook notifications: a JSON event to every configured URL on each manifest push and delete.

The envelope is Distribution's (``application/vnd.docker.distribution.events.v1+json``), so receivers written
for ``registry:2`` work unchanged::

    {"events": [{"id": "...", "timestamp": "2024-01-01T00:00:00.000000Z", "action": "push",
                 "target": {"mediaType": "...", "size": 528, "digest": "sha256:...", "length": 528,
                            "repository": "my/app", "url": "http://mirror:5000/v2/my/app/manifests/sha256:...",
                            "tag": "1.0"},
                 "request": {"id": "...", "addr": "10.0.0.7", "host": "mirror:5000", "method": "PUT",
                             "useragent": "docker/24.0 ..."},
                 "actor": {"name": "alice"},
                 "source": {"addr": "mirror-host:5000", "instanceID": "..."}}]}

Delivery never blocks a push: ``publish`` only enqueues. Each endpoint has its own queue and worker, which sends
events in order and retries a failed one (connection error, timeout, non-2xx) with exponential backoff up to
``attempts`` times. A full queue (``QUEUE_SIZE``) drops its oldest event, counted in ``mirror_notifications_total``
and logged.

The queue is an ``EventQueue``: ``MemoryQueue`` for one node, whose events still queued at shutdown are lost (logged);
with ``[cluster]``, ``storage.redisqueue.RedisQueue``, in the replicas' Redis, so each event is sent once whichever
replica the push reached, and the events of a replica that stops or dies are sent by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import aiohttp

from mirror.metrics import Metrics

log = logging.getLogger(__name__)
EVENTS_TYPE = "application/vnd.docker.distribution.events.v1+json"
QUEUE_SIZE = 1000
MAX_BACKOFF = 60.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 5.0
    attempts: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubles each time, at most MAX_BACKOFF


@dataclass(frozen=True, slots=True)
class RequestInfo:
    id: str
    addr: str
    host: str
    method: str
    useragent: str


@dataclass(frozen=True, slots=True)
class Event:
    action: str  # "push" or "delete"
    repository: str
    digest: str
    media_type: str
    size: int
    tag: str | None
    actor: str | None
    url: str
    request: RequestInfo

    def envelope_entry(self, source_addr: str, instance: str) -> dict[str, Any]:
        target: dict[str, Any] = {
            "mediaType": self.media_type,
            "size": self.size,
            "digest": self.digest,
            "length": self.size,
            "repository": self.repository,
            "url": self.url,
        }
        if self.tag:
            target["tag"] = self.tag
        return {
            "id": str(uuid.uuid4()),
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "action": self.action,
            "target": target,
            "request": {
                "id": self.request.id,
                "addr": self.request.addr,
                "host": self.request.host,
                "method": self.request.method,
                "useragent": self.request.useragent,
            },
            "actor": {"name": self.actor} if self.actor else {},
            "source": {"addr": source_addr, "instanceID": instance},
        }


class EventQueue(Protocol):
    """One endpoint's queue of events (envelope entries as JSON text), oldest first, bounded: a full queue drops its
    oldest entry and says how many through the ``dropped`` callback it was made with (``QueueFactory``)."""

    def put(self, entry: str) -> None:
        """Append ``entry`` without waiting (the push path): never raises, never blocks."""

    async def take(self) -> str:
        """The oldest entry, once there is one and this process is the one to send it; it stays queued (in flight)
        until ``done``."""

    async def done(self, entry: str) -> None:
        """``entry``, from ``take``, was sent or given up on: it leaves the queue."""

    async def join(self) -> None:
        """Until nothing is queued or in flight (tests; a graceful flush)."""

    async def close(self) -> int:
        """Stop, after the worker's task was cancelled; how many entries are lost with this process."""


# (endpoint url, bound, dropped(count)) -> its queue: MemoryQueue, or the replicas' queue picked in ``backends``
QueueFactory = Callable[[str, int, Callable[[int], None]], EventQueue]


class MemoryQueue:
    """One process's queue (no ``[cluster]``): what is still queued when the process stops is lost."""

    def __init__(self, url: str, size: int, dropped: Callable[[int], None]):
        self._queue: asyncio.Queue[str] = asyncio.Queue(size)
        self._dropped = dropped

    def put(self, entry: str) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._queue.task_done()
            self._dropped(1)
        self._queue.put_nowait(entry)

    async def take(self) -> str:
        return await self._queue.get()

    async def done(self, entry: str) -> None:
        self._queue.task_done()

    async def join(self) -> None:
        await self._queue.join()

    async def close(self) -> int:
        return self._queue.qsize()


class Notifier:
    def __init__(
        self,
        endpoints: list[Endpoint],
        metrics: Metrics,
        source_addr: str,
        user_agent: str,
        queues: QueueFactory = MemoryQueue,
    ):
        self._endpoints = endpoints
        self._metrics = metrics
        self._source_addr = source_addr
        self._user_agent = user_agent
        self._instance = str(uuid.uuid4())
        self._make_queue = queues
        self._queues: list[EventQueue] = []
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._endpoints)

    async def start(self) -> None:
        if not self._endpoints:
            return
        self._session = aiohttp.ClientSession(headers={"User-Agent": self._user_agent})
        for endpoint in self._endpoints:
            queue = self._make_queue(endpoint.url, QUEUE_SIZE, partial(self._dropped, endpoint.url))
            self._queues.append(queue)
            self._workers.append(asyncio.create_task(self._deliver(endpoint, queue), name=f"notify {endpoint.url}"))

    def publish(self, event: Event) -> None:
        """Queue an event for every endpoint; returns at once."""
        if not self._queues:
            return
        entry = json.dumps(event.envelope_entry(self._source_addr, self._instance))
        for queue in self._queues:
            queue.put(entry)

    def _dropped(self, url: str, count: int) -> None:
        self._metrics.notifications.labels("dropped").inc(count)
        log.warning("notification queue for %s is full: dropped %d of its oldest events", url, count)

    async def _deliver(self, endpoint: Endpoint, queue: EventQueue) -> None:
        while True:
            entry = await queue.take()
            await self._deliver_one(endpoint, entry)
            await queue.done(entry)

    async def _deliver_one(self, endpoint: Endpoint, entry: str) -> None:
        body = f'{{"events": [{entry}]}}'.encode()
        delay = endpoint.backoff
        for attempt in range(1, endpoint.attempts + 1):
            error = await self._send(endpoint, body)
            if error is None:
                self._metrics.notifications.labels("sent").inc()
                return
            if attempt == endpoint.attempts:
                self._metrics.notifications.labels("failed").inc()
                fields = json.loads(entry)
                log.warning(
                    "notification %s %s to %s failed %d times, dropped: %s",
                    fields["action"],
                    fields["target"]["digest"],
                    endpoint.url,
                    attempt,
                    error,
                )
                return
            self._metrics.notifications.labels("retried").inc()
            log.info("notification to %s failed (%s); retrying in %.1f s", endpoint.url, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _send(self, endpoint: Endpoint, body: bytes) -> str | None:
        """POST one envelope; None on success (any 2xx), else the reason."""
        assert self._session is not None
        headers = {**endpoint.headers, "Content-Type": EVENTS_TYPE}
        try:
            async with self._session.post(
                endpoint.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=endpoint.timeout)
            ) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return str(exc) or type(exc).__name__

    async def lifecycle(self, _app: Any) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx``: started with the app, closed at shutdown (before the Redis link it may use)."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    async def drain(self) -> None:
        """Wait until every queued event has been delivered or given up on (tests; a graceful flush)."""
        for queue in self._queues:
            await queue.join()

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pending = 0
        for queue in self._queues:
            pending += await queue.close()
        if pending:
            log.warning("%d notifications were still queued at shutdown and are lost", pending)
        if self._session is not None:
            await self._session.close()
