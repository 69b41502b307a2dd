"""The fetch-coordination seam: one upstream fetch per (upstream, digest), however many clients ask at once.

``FetchCoordinator`` and ``FetchState`` are the seam: the miss path (``pull.blobs``) and the HTTP layer talk to
them only. ``InFlight`` and ``Fetch`` are the in-process implementation; ``pull.filelock`` coordinates processes
sharing a data dir (file locks), and one for replicas (Redis leases) will follow; ``app.create_app`` picks one.

The first request for a missing blob starts a ``Fetch``: a background task, owned here and not by any client,
that streams the upstream body into a temp file. Every client -- the first one included -- reads that growing
file up to ``written`` and waits for more, so the first bytes reach clients as soon as they land and a client that
disconnects never cuts the fetch short for the others. The last bytes are released only after the digest is
verified (see ``Fetch.readable``), so no client ever receives a complete body whose digest is wrong.

Small objects (manifests, tag revalidations) use ``Coalescer``: concurrent callers share one awaited result. Across
processes sharing a data dir, ``RefLocking`` (``storage.reflocks``) lets one process at a time ask the upstream
about a ref; alone on the data dir, ``ProcessOnly`` (the coalescing is all there is to do).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from mirror.oci.reference import Digest

log = logging.getLogger(__name__)
T = TypeVar("T")
PUBLISH_GRACE = 60.0  # seconds a stopping mirror waits for verified blobs to be published (an fsync, a rename)


@dataclass(frozen=True, slots=True)
class RemoteFetch:
    """A fetch another process runs, as far as it tells: no clients of this process, a wall-clock start."""

    registry: str
    digest: Digest
    repo: str
    size: int | None
    written: int
    started: float  # time.time()


class FetchState(Protocol):
    """One blob fetch, as its task reports it (``begin``, ``advance``, ``finish``, ``fail``) and as every client
    streaming it follows it (``readable``, the ``wait_*`` methods) and learns its outcome (``final_path`` or
    ``error``)."""

    @property
    def digest(self) -> Digest: ...

    @property
    def size(self) -> int | None: ...  # from the upstream's Content-Length, once it answered

    @property
    def temp_path(self) -> Path | None: ...  # the growing file, once the upstream answered

    @property
    def final_path(self) -> Path | None: ...  # set once verified and published in the store

    @property
    def verified(self) -> bool: ...  # the digest matched: every byte may be sent, before the blob is published

    @property
    def written(self) -> int: ...

    @property
    def error(self) -> BaseException | None: ...

    @property
    def done(self) -> bool: ...

    @property
    def repo(self) -> str: ...  # the repository of the request that started it (for the web page)

    @property
    def started_at(self) -> float: ...  # time.monotonic() when it started

    clients: int  # clients streaming it now (``api.streaming`` counts them in and out)

    # Set by a coordinator before the fetching task runs: ``temp_path`` holds the first bytes of this blob from a
    # fetch that was interrupted (its process died) and the task continues from them (``pull.resume``).
    resume: bool
    # Set by a coordinator that knows the store held no such blob when the fetch began (``pull.leases``): the task
    # need not look at the store again before it asks the upstream.
    unstored: bool

    def readable(self) -> int: ...

    def begin(self, size: int | None, temp_path: Path) -> None: ...

    def advance(self, written: int) -> None: ...

    def verify(self) -> None: ...

    def finish(self, final_path: Path) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    async def wait_started(self) -> None: ...

    async def wait_beyond(self, offset: int) -> None: ...

    async def wait_done(self) -> None: ...


FetchRun = Callable[[FetchState], Awaitable[None]]  # the fetching task's body: upstream -> temp file -> publish


class FetchCoordinator(Protocol):
    """Start or join the fetch of a digest from one upstream; look one up (a HEAD never starts a fetch), and
    tell eviction what is being fetched."""

    def join(self, registry: str, digest: Digest, run: FetchRun, repo: str = "") -> tuple[FetchState, bool]:
        """The fetch under way, or a new one running ``run`` (for ``repo``); True when this call started it."""
        ...

    def get(self, registry: str, digest: Digest) -> FetchState | None: ...

    async def announced(self, registry: str, digest: Digest) -> int | None:
        """The size of a fetch of ``digest`` from ``registry`` that another process (or replica) runs, as it
        announced it; None when there is none, or it announced no size. What a HEAD answers from."""
        ...

    def under_way(self) -> list[tuple[str, FetchState]]:
        """Every fetch of this process under way, with its upstream registry (for the web page)."""
        ...

    async def elsewhere(self) -> list[RemoteFetch]:
        """The fetches other processes (or replicas) run that this one has no client of (for the web page)."""
        ...

    def fetching(self, digest: Digest) -> bool: ...

    async def close(self) -> None: ...


class Fetch:
    """The state of one blob being fetched, shared by its task and every client reading it."""

    def __init__(self, digest: Digest, repo: str = ""):
        self.digest = digest
        self.repo = repo
        self.started_at = time.monotonic()
        self.clients = 0
        self.resume = False
        self.unstored = False
        self.size: int | None = None  # from the upstream's Content-Length, once it answered
        self.temp_path: Path | None = None
        self.final_path: Path | None = None  # set once verified and renamed into the store
        self.verified = False  # the digest matched (before the fsync and rename that publish it)
        self.written = 0
        self.error: BaseException | None = None
        self._started = asyncio.Event()
        self._progress = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.final_path is not None or self.error is not None

    def readable(self) -> int:
        """Bytes a client may be sent now. One byte is held back until the digest is verified: a client cannot
        receive a complete body before the mirror knows it is right. Publishing (fsync, rename, the index) comes
        after and does not hold the clients back: their bytes are right whether or not the store keeps them."""
        if self.verified or self.final_path is not None:
            return self.written
        return max(0, self.written - 1)

    # --- called by the fetching task -------------------------------------------------------------------------
    def begin(self, size: int | None, temp_path: Path) -> None:
        self.size = size
        self.temp_path = temp_path
        self._started.set()

    def advance(self, written: int) -> None:
        self.written = written
        self._notify()

    def verify(self) -> None:
        self.verified = True
        self._notify()

    def finish(self, final_path: Path) -> None:
        self.final_path = final_path
        self.verified = True
        self._started.set()
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._started.set()
        self._notify()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    # --- called by clients ----------------------------------------------------------------------------------
    async def wait_started(self) -> None:
        """Wait until the upstream answered; raise the fetch's error if it failed before sending a byte."""
        await self._started.wait()
        if self.error is not None and self.written == 0:
            raise self.error

    async def wait_beyond(self, offset: int) -> None:
        """Wait until more than ``offset`` bytes are readable, or the fetch ended."""
        while self.readable() <= offset and not self.done:
            await self._progress.wait()

    async def wait_done(self) -> None:
        """Wait until the blob is verified and committed, or the fetch failed."""
        while not self.done:
            await self._progress.wait()


class InFlight:
    """The table of blob fetches under way, one per (upstream registry, digest): a client joins only a fetch from
    the upstream its name routes to, so content one upstream is sending is never handed to a name of another
    (``PullThrough.vouch`` holds the same rule for stored content). Owned by the app (no module state)."""

    def __init__(self, new_fetch: Callable[[Digest, str], Fetch] = Fetch) -> None:
        self._new_fetch = new_fetch  # the state of a new fetch (another coordinator may extend ``Fetch``)
        self._fetches: dict[tuple[str, Digest], Fetch] = {}
        self._tasks: dict[asyncio.Task[None], Fetch] = {}  # each fetch's own task

    def __len__(self) -> int:
        return len(self._fetches)

    def get(self, registry: str, digest: Digest) -> Fetch | None:
        return self._fetches.get((registry, digest))

    def fetching(self, digest: Digest) -> bool:
        """Whether ``digest`` is being fetched from any upstream (eviction leaves it alone meanwhile)."""
        return any(key[1] == digest for key in self._fetches)

    async def announced(self, registry: str, digest: Digest) -> int | None:
        return None  # alone: there is nobody else

    def under_way(self) -> list[tuple[str, FetchState]]:
        return [(registry, fetch) for (registry, _), fetch in self._fetches.items()]

    async def elsewhere(self) -> list[RemoteFetch]:
        return []  # alone: there is nobody else

    def join(self, registry: str, digest: Digest, run: FetchRun, repo: str = "") -> tuple[Fetch, bool]:
        """The fetch of ``digest`` from ``registry`` under way, or a new one started with ``run``. True when this
        call started it."""
        key = (registry, digest)
        fetch = self._fetches.get(key)
        if fetch is not None and fetch.error is None:
            return fetch, False
        # None, or one that failed and is still winding down (its task cleaning up): a new client gets a new fetch,
        # never a dead one that would cut it right after the headers.
        fetch = self._new_fetch(digest, repo)
        self._fetches[key] = fetch
        task = asyncio.create_task(self._run(key, fetch, run), name=f"fetch {digest} from {registry}")
        self._tasks[task] = fetch
        task.add_done_callback(self._forget)
        return fetch, True

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _run(self, key: tuple[str, Digest], fetch: Fetch, run: FetchRun) -> None:
        try:
            await run(fetch)
        except BaseException as exc:  # the fetch's clients receive it; the task itself ends quietly
            if not fetch.done:
                fetch.fail(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if self._fetches.get(key) is fetch:  # a failed fetch may have been replaced already
                del self._fetches[key]
            if not fetch.done:
                fetch.fail(RuntimeError("fetch ended without a result"))

    async def close(self) -> None:
        """Stop every fetch, but let those whose bytes are verified finish publishing (their clients have the
        whole blob already: a graceful stop keeps it), for up to PUBLISH_GRACE seconds."""
        publishing = [task for task, fetch in self._tasks.items() if fetch.verified]
        if publishing:
            await asyncio.wait(publishing, timeout=PUBLISH_GRACE)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


if TYPE_CHECKING:  # each implementation checked against its protocol by mypy (nothing runs)
    _fetch: FetchState = Fetch(Digest.parse("sha256:" + "0" * 64))
    _coordinator: FetchCoordinator = InFlight()


class Coalescer(Generic[T]):
    """Concurrent calls with the same key share one execution and its result (or exception).

    The call runs as its own task, so a caller that goes away (client disconnect) does not cancel it for the
    others.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, asyncio.Task[T]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The result and whether this caller joined a call already under way."""
        task = self._pending.get(key)
        joined = task is not None
        if task is None:

            async def _call() -> T:
                try:
                    return await call()
                finally:
                    self._pending.pop(key, None)

            task = asyncio.ensure_future(_call())
            self._pending[key] = task
        return await asyncio.shield(task), joined


class RefLocking(Protocol):
    """Host-wide exclusion of the upstream requests about one ref (a tag, a manifest by digest): inside the block,
    no other process sharing the data dir asks the upstream about ``key``; False when that could not be had within
    ``within`` seconds (the block runs anyway). The caller re-reads what another holder may have stored."""

    def hold(self, key: str, within: float) -> AbstractAsyncContextManager[bool]: ...


class ProcessOnly:
    """``RefLocking`` of a process alone on its data dir: nobody else asks, nothing to wait for."""

    @asynccontextmanager
    async def hold(self, key: str, within: float) -> AsyncIterator[bool]:
        yield True


if TYPE_CHECKING:
    _ref_locking: RefLocking = ProcessOnly()
