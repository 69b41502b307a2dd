"""The upstream client: one ``aiohttp.ClientSession`` per upstream, with timeouts, User-Agent and auth.

Everything the mirror asks another registry goes through ``UpstreamClient``: manifests (HEAD and GET), blobs
(streamed, never buffered), and tag lists. Redirects are followed by hand so that the ``Authorization`` header is
only ever sent to the upstream's own host (Docker Hub answers blob GETs with a 307 to a CDN).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from mirror.metrics import Metrics
from mirror.oci.manifest import sniff_media_type
from mirror.oci.reference import Digest
from mirror.upstream.auth import Challenge, Credentials, TokenSource, parse_challenge
from mirror.upstream.bodies import (
    MAX_MANIFEST,
    MAX_REFERRERS,
    MAX_TAG_LIST,
    BodyTooLarge,
    read_bounded,
    read_error_body,
    read_json,
)
from mirror.upstream.errors import UpstreamError, UpstreamInvalid, UpstreamUnreachable
from mirror.upstream.health import Health
from mirror.upstream.quota import Quota, QuotaRecord

log = logging.getLogger(__name__)
MAX_REDIRECTS = 5
READ_BUFFER = 1 << 20
_P = ParamSpec("_P")
_T = TypeVar("_T")


def _counted(
    method: Callable[Concatenate[UpstreamClient, _P], Awaitable[_T]],
) -> Callable[Concatenate[UpstreamClient, _P], Awaitable[_T]]:
    """Count a call in ``UpstreamClient.users`` while it runs (a client in use is never closed by routing)."""

    @wraps(method)
    async def counted(self: UpstreamClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        self.users += 1
        try:
            return await method(self, *args, **kwargs)
        finally:
            self.users -= 1

    return counted


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    registry: str  # the name clients use, e.g. "docker.io"; the metrics label
    url: str  # where to reach it, e.g. "https://registry-1.docker.io"
    credentials: Credentials | None = None
    token: str | None = None  # a static Bearer token: sent as is, no handshake
    timeout: float = 10.0  # connect, and wait for response headers
    max_connections: int = 0  # connections to one host at once (the upstream, its CDN); 0 = no limit
    ratelimit_threshold: int = 10  # see Quota
    ratelimit_pause: float = 600.0
    read_timeout: float = 60.0  # longest silence while streaming a body
    user_agent: str = "mirror"
    max_blob_size: int = 16 << 30  # a blob announced larger is refused before its body is read
    min_rate: float = 4096.0  # bytes/s a blob body must average over each rate_window (0: no floor)...
    rate_window: float = 30.0  # ...seconds, or the fetch is cut (a drip, not a download)
    loop_id: str = ""  # sent as X-Mirror-Fetch; a mirror seeing its own id answers at once (a redirect loop)


LOOP_HEADER = "X-Mirror-Fetch"  # the id of the mirror process that sent a request upstream


def describe(exc: BaseException) -> str:
    """A short, readable reason for a failed upstream call (timeouts have an empty ``str``)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _registry_errors(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return [e for e in body["errors"] if isinstance(e, dict)]
    return []


class UpstreamClient:
    def __init__(self, settings: UpstreamSettings, metrics: Metrics, quota: QuotaRecord | None = None):
        self.settings = settings
        self.registry = settings.registry
        self._base = URL(settings.url.rstrip("/"))
        self._metrics = metrics
        # Created on first use: an aiohttp session must be made inside the running event loop.
        self._session_obj: aiohttp.ClientSession | None = None
        self._tokens_obj: TokenSource | None = None
        self._challenge: Challenge | None = None  # learned from the first 401
        # ``quota``: the record shared with the other processes on the data dir, if any (``upstream.quota``).
        self.quota = Quota(settings.ratelimit_threshold, settings.ratelimit_pause, shared=quota)
        self.users = 0  # calls under way; a blob download counts until its response is released
        self.health = Health()

    @property
    def _session(self) -> aiohttp.ClientSession:
        if self._session_obj is None:
            self._session_obj = aiohttp.ClientSession(
                headers={"User-Agent": self.settings.user_agent},
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self.settings.timeout,
                    sock_connect=self.settings.timeout,
                    sock_read=self.settings.read_timeout,
                ),
                read_bufsize=READ_BUFFER,
                auto_decompress=False,
                connector=aiohttp.TCPConnector(
                    limit=max(64, self.settings.max_connections), limit_per_host=self.settings.max_connections
                ),
            )
        return self._session_obj

    @property
    def _tokens(self) -> TokenSource:
        if self._tokens_obj is None:
            self._tokens_obj = TokenSource(self._session, self.settings.credentials, self.settings.timeout)
        return self._tokens_obj

    async def close(self) -> None:
        await self.quota.settle()
        if self._session_obj is not None:
            await self._session_obj.close()

    # ---------------------------------------------------------------------------------------------------------
    async def _auth_header(self, scope: str) -> dict[str, str]:
        if self.settings.token:
            return {"Authorization": f"Bearer {self.settings.token}"}
        challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            creds = self.settings.credentials
            return {"Authorization": creds.basic()} if creds else {}
        return {"Authorization": f"Bearer {await self._tokens.token(challenge, scope)}"}

    def _same_origin(self, url: URL) -> bool:
        return (url.scheme, url.host, url.port) == (self._base.scheme, self._base.host, self._base.port)

    async def _send(
        self,
        method: str,
        path: str,
        kind: str,
        scope: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request, doing the auth handshake and following redirects; the caller releases the response.

        Raises UpstreamUnreachable when nothing answers and UpstreamError for any non-2xx final answer.
        """
        started = time.monotonic()
        try:
            resp = await self._send_inner(method, path, scope, headers or {}, params)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._record(kind, "unreachable", started, describe(exc))
            raise UpstreamUnreachable(f"{self.registry}: {describe(exc)}") from exc
        except UpstreamUnreachable as exc:
            self._record(kind, "unreachable", started, str(exc))
            raise
        self._note_ratelimit(resp.headers)
        if resp.status == 429:
            self.quota.rate_limited(resp.headers.get("Retry-After"))
        if resp.status >= 400:
            looped = bool(self.settings.loop_id) and resp.headers.get(LOOP_HEADER) == self.settings.loop_id
            body = await read_error_body(resp, self.settings.timeout) if method != "HEAD" and not looped else None
            resp.release()
            if looped:
                self._record(kind, "error", started, "the answer leads back to this mirror")
                raise UpstreamInvalid(f"{resp.url} is this mirror itself: the upstream's answer leads back here")
            outcome = {401: "unauthorized", 403: "denied", 404: "not_found", 429: "rate_limited"}.get(
                resp.status, "error"
            )
            self._record(kind, outcome, started, f"{kind}: HTTP {resp.status}")
            raise UpstreamError(resp.status, _registry_errors(body), resp.headers.get("Retry-After"), str(resp.url))
        self._record(kind, "ok", started)
        return resp

    async def _send_inner(
        self, method: str, path: str, scope: str, headers: Mapping[str, str], params: Mapping[str, str] | None
    ) -> aiohttp.ClientResponse:
        url = self._base.with_path(self._base.path.rstrip("/") + path, encoded=False)
        if params:
            url = url.with_query(params)
        retried_auth = False
        for _ in range(MAX_REDIRECTS + 1):
            send_headers = dict(headers)
            if self.settings.loop_id:
                send_headers[LOOP_HEADER] = self.settings.loop_id
            if self._same_origin(url):
                send_headers.update(await self._auth_header(scope))
            resp = await self._session.request(method, url, headers=send_headers, allow_redirects=False)
            if resp.status == 401 and self._same_origin(url) and not retried_auth and not self.settings.token:
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                if challenge is not None and (challenge.scheme == "bearer" or self.settings.credentials):
                    resp.release()
                    if self._challenge is not None and self._challenge.scheme == "bearer":
                        await self._tokens.forget(self._challenge, scope)
                    self._challenge = challenge
                    retried_auth = True
                    continue
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                location = URL(urljoin(str(url), resp.headers["Location"]), encoded=True)
                resp.release()
                url = location
                if resp.status == 303:
                    method = "GET"
                continue
            return resp
        raise UpstreamUnreachable(f"{self.registry}: too many redirects")

    def _record(self, kind: str, outcome: str, started: float, reason: str = "") -> None:
        self.health.record(outcome, reason)
        self._metrics.upstream_requests.labels(self.registry, kind, outcome).inc()
        self._metrics.upstream_duration.labels(self.registry, kind).observe(time.monotonic() - started)

    def _note_ratelimit(self, headers: Mapping[str, str]) -> None:
        # Docker Hub sends e.g. "ratelimit-remaining: 76;w=21600".
        for header, gauge in (
            ("ratelimit-limit", self._metrics.ratelimit_limit),
            ("ratelimit-remaining", self._metrics.ratelimit_remaining),
        ):
            value = headers.get(header)
            if value:
                with suppress(ValueError):
                    number = float(value.split(";", 1)[0])
                    gauge.labels(self.registry).set(number)
                    if header == "ratelimit-remaining":
                        self.quota.remaining(number)

    # ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def _scope(repo_path: str) -> str:
        return f"repository:{repo_path}:pull"

    def _manifest_head(self, resp: aiohttp.ClientResponse, data: bytes | None) -> ManifestHead:
        media_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if data is not None and (not media_type or media_type in ("application/json", "text/plain")):
            media_type = sniff_media_type(data) or media_type
        header_digest = resp.headers.get("Docker-Content-Digest")
        if data is not None:
            algorithm = header_digest.split(":", 1)[0] if header_digest else "sha256"
            digest = Digest.of(data, algorithm if algorithm in ("sha256", "sha512") else "sha256")
            size = len(data)
        elif header_digest:
            digest = Digest.parse(header_digest)
            size = int(resp.headers.get("Content-Length", "-1"))
        else:
            raise UpstreamInvalid("HEAD answer without Docker-Content-Digest")
        return ManifestHead(digest, media_type, size)

    @_counted
    async def head_manifest(self, repo_path: str, ref: str, accept: str) -> ManifestHead:
        """Resolve a tag (or check a digest) without downloading: HEADs do not count against Docker Hub's limit."""
        resp = await self._send(
            "HEAD", f"/v2/{repo_path}/manifests/{ref}", "manifest_head", self._scope(repo_path), {"Accept": accept}
        )
        try:
            return self._manifest_head(resp, None)
        finally:
            resp.release()

    @_counted
    async def get_manifest(self, repo_path: str, ref: str, accept: str) -> tuple[ManifestHead, bytes]:
        resp = await self._send(
            "GET", f"/v2/{repo_path}/manifests/{ref}", "manifest", self._scope(repo_path), {"Accept": accept}
        )
        try:
            data = await read_bounded(resp, MAX_MANIFEST, "manifest")
            self._metrics.upstream_bytes_fetched.labels(self.registry).inc(len(data))
            head = self._manifest_head(resp, data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"{self.registry}: {describe(exc)}") from exc
        finally:
            resp.release()
        header_digest = resp.headers.get("Docker-Content-Digest")
        if header_digest and header_digest != str(head.digest):
            raise UpstreamInvalid(f"manifest hashes to {head.digest}, upstream said {header_digest}")
        if ":" in ref and ref != str(head.digest):
            raise UpstreamInvalid(f"manifest hashes to {head.digest}, asked for {ref}")
        return head, data

    @asynccontextmanager
    async def blob(self, repo_path: str, digest: Digest, start: int = 0) -> AsyncIterator[aiohttp.ClientResponse]:
        """Open a blob download; the caller streams ``resp.content``. The response is released on exit. From
        ``start`` > 0 it asks for the rest only (``Range: bytes=start-``): the caller checks the answer, a 206
        with that range or a 200 with the whole blob (RFC 9110 section 14.2: a server may ignore Range)."""
        self.users += 1
        try:
            rest = {"Range": f"bytes={start}-"} if start else None
            resp = await self._send("GET", f"/v2/{repo_path}/blobs/{digest}", "blob", self._scope(repo_path), rest)
            try:
                if resp.content_length is not None and resp.content_length > self.settings.max_blob_size:
                    size, limit = resp.content_length, self.settings.max_blob_size
                    raise BodyTooLarge(f"blob {digest} of {size} bytes is", limit, "max_blob_size")
                yield resp
            finally:
                resp.release()
        finally:
            self.users -= 1

    @_counted
    async def head_blob(self, repo_path: str, digest: Digest) -> int:
        """The size of a blob the upstream holds (its Content-Length), without downloading it."""
        resp = await self._send("HEAD", f"/v2/{repo_path}/blobs/{digest}", "blob_head", self._scope(repo_path))
        resp.release()
        if resp.content_length is None:
            raise UpstreamInvalid("blob HEAD answer without Content-Length")
        return resp.content_length

    @_counted
    async def list_tags(self, repo_path: str, params: Mapping[str, str]) -> tuple[dict[str, Any], str | None]:
        """One page of ``tags/list`` and the upstream's ``Link`` header, if any."""
        resp = await self._send("GET", f"/v2/{repo_path}/tags/list", "tags", self._scope(repo_path), params=params)
        try:
            body = await read_json(resp, MAX_TAG_LIST, "tags/list answer")
        except (ValueError, UpstreamInvalid, aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"{self.registry}: bad tags/list answer: {describe(exc)}") from exc
        finally:
            resp.release()
        if not isinstance(body, dict):
            raise UpstreamUnreachable(f"{self.registry}: tags/list answer is not an object")
        return body, resp.headers.get("Link")

    @_counted
    async def referrers(self, repo_path: str, digest: Digest, params: Mapping[str, str]) -> tuple[Any, bool]:
        """The upstream's OCI 1.1 referrers index of ``digest`` (parsed JSON), and whether it applied the
        ``artifactType`` filter (``OCI-Filters-Applied``). An upstream without the API answers 404."""
        resp = await self._send(
            "GET",
            f"/v2/{repo_path}/referrers/{digest}",
            "referrers",
            self._scope(repo_path),
            {"Accept": "application/vnd.oci.image.index.v1+json"},
            params,
        )
        try:
            body = await read_json(resp, MAX_REFERRERS, "referrers index")
        except ValueError as exc:
            raise UpstreamInvalid(f"referrers answer is not JSON: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"{self.registry}: {describe(exc)}") from exc
        finally:
            resp.release()
        filters = resp.headers.get("OCI-Filters-Applied", "")
        return body, "artifactType" in filters
