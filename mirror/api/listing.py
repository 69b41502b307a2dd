"""Listings with ``n``/``last`` pagination:

- ``GET /v2/<name>/tags/list`` (OCI distribution spec, "Listing Tags");
- ``GET /v2/_catalog`` (Docker registry API, "Listing repositories"): the local (pushed) repositories.
  Pulled-through repositories are a cache, not a catalog. Only the repositories the caller may pull are listed
  (``[[access]]`` rules), and pages are cut after that filter.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from mirror.api.access import ACTOR
from mirror.api.content import content_for
from mirror.api.keys import ACCESS, LOCAL, RESOLVE
from mirror.oci.errors import PaginationInvalid
from mirror.permissions import Action

MAX_PAGE = 10000


def parse_page(request: web.Request) -> tuple[int | None, str | None]:
    raw_n = request.query.get("n")
    n: int | None = None
    if raw_n is not None:
        # ASCII digits only: str.isdigit() also accepts "²" (int() refuses it) and "٣" (int() reads it as 3).
        if not (raw_n.isascii() and raw_n.isdigit()) or len(raw_n) > 6 or int(raw_n) > MAX_PAGE:
            raise PaginationInvalid(f"n must be an integer from 0 to {MAX_PAGE}", detail={"n": raw_n[:50]})
        n = int(raw_n)
    last = request.query.get("last")
    if last is not None and (len(last) > 256 or not last.isprintable()):
        raise PaginationInvalid("invalid last parameter")
    return n, last


def next_link(request: web.Request, last: str, n: int | None) -> str:
    """A ``Link`` to the next page on this mirror (the upstream's own Link names its path, not ours)."""
    query = {k: v for k, v in request.query.items() if k not in ("n", "last")}
    query["last"] = last
    if n is not None:
        query["n"] = str(n)
    return f'<{request.path}?{urlencode(query)}>; rel="next"'


async def list_tags(request: web.Request) -> web.Response:
    repo = request.app[RESOLVE](request.match_info["name"], request.query.get("ns"))
    n, last = parse_page(request)
    tags, upstream_link = await content_for(request.app, repo).list_tags(repo, n, last)
    headers = {}
    if tags and (upstream_link or (n is not None and len(tags) >= n > 0)):
        headers["Link"] = next_link(request, tags[-1], n)
    return web.json_response({"name": repo.path, "tags": tags}, headers=headers)


async def catalog(request: web.Request) -> web.Response:
    n, last = parse_page(request)
    access, actor = request.app[ACCESS], request.get(ACTOR)
    every, _ = request.app[LOCAL].catalog(None, last)
    allowed = [name for name in every if access.may(actor, Action.PULL, name)]
    names, more = (allowed, False) if n is None else (allowed[:n], len(allowed) > n)
    headers = {"Link": next_link(request, names[-1], n)} if more and names else {}
    return web.json_response({"repositories": names}, headers=headers)
