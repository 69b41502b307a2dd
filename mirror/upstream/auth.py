"""Upstream authentication: ``WWW-Authenticate`` parsing and the Bearer token handshake.

Docker's token spec (distribution ``docs/spec/auth/token.md``): a 401 carries
``WWW-Authenticate: Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="..."``; the
client GETs ``realm?service=...&scope=...`` (anonymously, or with Basic credentials) and receives
``{"token": ..., "expires_in": ...}`` (``access_token`` is accepted as a synonym). Tokens are cached per
(realm, service, scope) until shortly before they expire. Upstreams that answer ``Basic realm=...`` get the
configured credentials as Basic auth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp
from aiocache import SimpleMemoryCache

from mirror.upstream.bodies import MAX_TOKEN, read_json
from mirror.upstream.errors import UpstreamError, UpstreamInvalid, UpstreamUnreachable

_PARAM_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
DEFAULT_TOKEN_LIFETIME = 60
# Refresh a token this many seconds before the upstream says it expires.
EXPIRY_MARGIN = 10


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower case
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        """The ``Authorization`` header value for Basic auth."""
        return aiohttp.encode_basic_auth(self.username, self.password)


def parse_challenge(header: str) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` header; None for an unknown scheme or garbage."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM_RE.finditer(rest)
    }
    params = {k: v.replace('\\"', '"') for k, v in params.items()}
    if scheme == "bearer" and "realm" not in params:
        return None
    return Challenge(scheme, params)


class TokenSource:
    """Gets and caches Bearer tokens for one upstream. Credentials go only to the realm the upstream named."""

    def __init__(self, session: aiohttp.ClientSession, credentials: Credentials | None, timeout: float):
        self._session = session
        self._credentials = credentials
        self._timeout = timeout
        self._tokens = SimpleMemoryCache(timeout=None)

    async def token(self, challenge: Challenge, scope: str) -> str:
        realm = challenge.params["realm"]
        service = challenge.params.get("service", "")
        key = f"{realm}|{service}|{scope}"
        cached = await self._tokens.get(key)
        if isinstance(cached, str):
            return cached
        query = {"scope": scope} if scope else {}
        if service:
            query["service"] = service
        try:
            async with self._session.get(
                realm,
                params=query,
                headers={"Authorization": self._credentials.basic()} if self._credentials else None,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                if resp.status != 200:
                    raise UpstreamError(resp.status, url=realm)
                body = await read_json(resp, MAX_TOKEN, "token endpoint answer")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"token endpoint {realm}: {exc!r}") from exc
        except (ValueError, UpstreamInvalid) as exc:  # not JSON, or larger than any token answer
            raise UpstreamError(
                502, [{"code": "UNAUTHORIZED", "message": f"token endpoint: {exc}"}], url=realm
            ) from exc
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamError(502, [{"code": "UNAUTHORIZED", "message": "token endpoint sent no token"}], url=realm)
        expires_in = body.get("expires_in", DEFAULT_TOKEN_LIFETIME)
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = DEFAULT_TOKEN_LIFETIME
        ttl = max(1, int(expires_in) - EXPIRY_MARGIN)
        await self._tokens.set(key, token, ttl=ttl)
        return token

    async def forget(self, challenge: Challenge, scope: str) -> None:
        key = f"{challenge.params['realm']}|{challenge.params.get('service', '')}|{scope}"
        await self._tokens.delete(key)
