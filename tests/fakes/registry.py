"""An in-process upstream registry with request counters and fault switches.

Used only for what a real registry cannot be made to show: the Bearer token handshake, Basic auth, 429 with
``Retry-After``, 5xx, a slow upstream, a connection cut mid-blob, bytes that do not match their digest, and a
307 redirect of blob GETs to another origin (as Docker Hub sends to its CDN); and hostile answers: bodies without
Content-Length that do not end, huge error bodies, manifests without a digest header, redirects to anywhere.
Everything else is tested against CNCF Distribution in ``tests/integration``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _accepted(request: web.Request) -> set[str]:
    return {t.split(";", 1)[0].strip() for h in request.headers.getall("Accept", []) for t in h.split(",")}


@dataclass
class Faults:
    token_auth: bool = False  # 401 + Bearer challenge until a token from /token is presented
    basic_auth: tuple[str, str] | None = None  # 401 + Basic challenge until these credentials are sent
    rate_limited: str | None = None  # 429 with this Retry-After on every /v2/ request
    down: bool = False  # 503 on every /v2/ request
    delay: float = 0.0  # seconds before answering any /v2/ request
    cut_blob_after: int | None = None  # close the connection after this many body bytes of a blob
    corrupt_blobs: bool = False  # flip a byte in every blob body (same length)
    redirect_blobs: bool = False  # 307 blob GETs to the same server under another origin (localhost)
    drip: int | None = None  # send blob bodies in pieces of this size, yielding in between
    drip_pause: float = 0.0
    ratelimit_remaining: int | None = None
    manifest_no_digest: bool = False  # manifest answers without Docker-Content-Digest
    blob_no_length: bool = False  # blob bodies chunked, without Content-Length
    endless_blobs: int | None = None  # blob bodies of this many bytes (chunked), whatever the blob holds
    endless_tags: int | None = None  # a tags/list answer of this many bytes (chunked, never valid JSON)
    error_body: int | None = None  # a 500 with a body of this many bytes for every request below /v2/
    redirect_to: str | None = None  # 307 every manifest and blob request to this base URL (same path)
    drip_manifests: bool = False  # manifest bodies dripped like blobs (drip, drip_pause)
    token_body: int | None = None  # the token endpoint answers 200 with a body of this many bytes


@dataclass
class FakeRegistry:
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    referrers: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (repo, subject) -> image index
    faults: Faults = field(default_factory=Faults)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request
    accepts: list[str] = field(default_factory=list)  # Accept header of every manifest request
    storage_auth_headers: list[str | None] = field(default_factory=list)  # Authorization seen by the "CDN"
    tokens_issued: int = 0
    active: int = 0  # /v2/ requests being answered right now...
    peak_active: int = 0  # ...and the most at once
    blob_started: asyncio.Event = field(default_factory=asyncio.Event)
    offered: int = 0  # bytes of generated bodies (endless_*, error_body) written so far

    # -- content ------------------------------------------------------------------------------------------
    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, media_type: str, body: bytes, tags: tuple[str, ...] = ()) -> str:
        digest = sha256(body)
        self.manifests[(repo, digest)] = (media_type, body)
        for tag in tags:
            self.manifests[(repo, tag)] = (media_type, body)
            if tag not in self.tags.setdefault(repo, []):
                self.tags[repo].append(tag)
        return digest

    def add_image(self, repo: str, tag: str | None, layers: list[bytes], arch: str = "amd64") -> str:
        """An OCI image manifest with a config and the given layers; returns the manifest digest."""
        layer_descs = [{"mediaType": OCI_LAYER, "digest": self.add_blob(b), "size": len(b)} for b in layers]
        config = json.dumps(
            {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.add_blob(config), "size": len(config)},
            "layers": layer_descs,
        }
        return self.add_manifest(repo, OCI_MANIFEST, json.dumps(manifest).encode(), (tag,) if tag else ())

    def add_index(self, repo: str, tag: str, children: dict[str, str]) -> str:
        """An OCI index over ``{arch: manifest digest}``."""
        entries = []
        for arch, digest in children.items():
            media_type, body = self.manifests[(repo, digest)]
            entries.append(
                {
                    "mediaType": media_type,
                    "digest": digest,
                    "size": len(body),
                    "platform": {"architecture": arch, "os": "linux"},
                }
            )
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return self.add_manifest(repo, OCI_INDEX, json.dumps(index).encode(), (tag,))

    # -- counters -----------------------------------------------------------------------------------------
    def count(self, method: str, kind: str) -> int:
        """Requests seen, e.g. ``count("GET", "blobs")`` or ``count("HEAD", "manifests")``."""
        return sum(1 for m, p in self.requests if m == method and f"/{kind}/" in p)

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter((m, p) for m, p in self.requests)

    # -- HTTP ---------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_get("/storage/{digest}", self._storage)
        app.router.add_route("*", "/v2/{tail:.*}", self._v2)
        return app

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.tokens_issued += 1
        if self.faults.token_body is not None:
            return await self._generated(request, self.faults.token_body, b'{"token": "', b"t")
        return web.json_response({"token": f"token-{self.tokens_issued}", "expires_in": 300})

    def _authorized(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if self.faults.token_auth and not header.startswith("Bearer token-"):
            scope = request.match_info["tail"].rsplit("/", 2)[0]
            challenge = f'Bearer realm="http://{request.host}/token",service="fake",scope="repository:{scope}:pull"'
            return self._error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge})
        if self.faults.basic_auth:
            user, password = self.faults.basic_auth
            expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if header != expected:
                return self._error(
                    401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": 'Basic realm="fake"'}
                )
        return None

    @staticmethod
    def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"errors": [{"code": code, "message": message}]}, status=status, headers=headers)

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            return await self._answer(request)
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        headers = {}
        if self.faults.ratelimit_remaining is not None:
            headers = {
                "ratelimit-limit": "100;w=21600",
                "ratelimit-remaining": f"{self.faults.ratelimit_remaining};w=21600",
            }
        if self.faults.down:
            return self._error(503, "UNAVAILABLE", "upstream down for the test")
        denied = self._authorized(request)
        if denied is not None:
            return denied
        if self.faults.rate_limited is not None:
            return self._error(429, "TOOMANYREQUESTS", "rate limited", {"Retry-After": self.faults.rate_limited})
        tail = request.match_info["tail"]
        if tail == "":
            return web.json_response({})
        if self.faults.error_body is not None:
            return await self._generated(request, self.faults.error_body, b'{"errors": [{"message": "', b"x", 500)
        repo, _, rest = tail.rpartition("/")
        repo, _, kind = repo.rpartition("/")
        if self.faults.redirect_to and kind in ("manifests", "blobs"):
            return web.Response(status=307, headers={"Location": self.faults.redirect_to.rstrip("/") + request.path})
        if kind == "manifests":
            self.accepts.append(request.headers.get("Accept", ""))
            found = self.manifests.get((repo, rest))
            if found is None:
                return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            media_type, body = found
            if media_type in (OCI_MANIFEST, OCI_INDEX) and media_type not in _accepted(request):
                # As Distribution does: an OCI type only for an Accept naming it (``*/*`` is not enough); Docker
                # types for anyone.
                kind_name = "manifest" if media_type == OCI_MANIFEST else "index"
                return self._error(
                    404, "MANIFEST_UNKNOWN", f"OCI {kind_name} found, but accept header does not support it"
                )
            headers["Content-Type"] = media_type
            if not self.faults.manifest_no_digest:
                headers["Docker-Content-Digest"] = sha256(body)
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(body))
                return web.Response(headers=headers)
            if self.faults.drip_manifests:
                return await self._send_blob(request, body)
            return web.Response(body=body, headers=headers)
        if kind == "referrers":
            index = self.referrers.get((repo, rest))
            if index is None:
                return self._error(404, "NOT_FOUND", "no referrers API here")
            return web.Response(body=index, headers={"Content-Type": OCI_INDEX})
        if kind == "blobs":
            data = self.blobs.get(rest)
            if data is None:
                return self._error(404, "BLOB_UNKNOWN", "blob unknown")
            if request.method == "HEAD":
                return web.Response(headers={"Content-Length": str(len(data)), "Docker-Content-Digest": rest})
            if self.faults.redirect_blobs:
                return web.Response(
                    status=307, headers={"Location": f"http://localhost:{request.url.port}/storage/{rest}"}
                )
            return await self._send_blob(request, data)
        if tail.endswith("/tags/list"):
            name = tail[: -len("/tags/list")]
            if self.faults.endless_tags is not None:
                head = f'{{"name": "{name}", "tags": ["'.encode()  # one tag name that never ends
                return await self._generated(request, self.faults.endless_tags, head, b"a")
            tags = sorted(self.tags.get(name, []))
            last = request.query.get("last")
            if last:
                tags = [t for t in tags if t > last]
            n = request.query.get("n")
            if n is not None:
                tags = tags[: int(n)]
            return web.json_response({"name": name, "tags": tags})
        return self._error(404, "NOT_FOUND", "no such endpoint")

    async def _storage(self, request: web.Request) -> web.StreamResponse:
        self.storage_auth_headers.append(request.headers.get("Authorization"))
        return await self._send_blob(request, self.blobs[request.match_info["digest"]])

    async def _send_blob(self, request: web.Request, data: bytes) -> web.StreamResponse:
        if self.faults.corrupt_blobs:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if self.faults.endless_blobs is not None:
            self.blob_started.set()
            return await self._generated(request, self.faults.endless_blobs, b"", bytes(1 << 20))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if self.faults.blob_no_length:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(data)
        await resp.prepare(request)
        self.blob_started.set()
        limit = self.faults.cut_blob_after
        step = self.faults.drip or len(data) or 1
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            if limit is not None and offset + len(piece) > limit:
                await resp.write(piece[: max(0, limit - offset)])
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(piece)
            if self.faults.drip:
                await asyncio.sleep(self.faults.drip_pause)
        await resp.write_eof()
        return resp

    async def _generated(
        self, request: web.Request, size: int, head: bytes, piece: bytes, status: int = 200
    ) -> web.StreamResponse:
        """A chunked body of ``size`` bytes (``head``, then ``piece`` over and over), made as it is sent, so the fake
        itself holds one piece however large the body; it stops early when the reader goes away."""
        piece = piece * max(1, (64 << 10) // len(piece))  # big writes, or the fake is the bottleneck
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        try:
            await resp.write(head)
            sent = len(head)
            while sent < size:
                part = piece[: size - sent]
                await resp.write(part)
                sent += len(part)
                self.offered += len(part)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):  # the mirror stopped reading and closed the connection
            pass
        return resp
