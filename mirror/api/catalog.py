"""``GET /v2/_catalog`` with ``n``/``last`` pagination (OCI distribution spec, "Listing repositories"; Docker
registry API): the local (pushed) repositories. Pulled-through repositories are a cache, not a catalog. Only the
repositories the caller may pull are listed (``[[access]]`` rules), and pages are cut after that filter."""

from __future__ import annotations

from aiohttp import web

from mirror.api.access import ACTOR
from mirror.api.keys import ACCESS, LOCAL
from mirror.api.listing import next_link, parse_page
from mirror.permissions import Action


async def catalog(request: web.Request) -> web.Response:
    n, last = parse_page(request)
    access, actor = request.app[ACCESS], request.get(ACTOR)
    every, _ = request.app[LOCAL].catalog(None, last)
    allowed = [name for name in every if access.may(actor, Action.PULL, name)]
    names, more = (allowed, False) if n is None else (allowed[:n], len(allowed) > n)
    headers = {"Link": next_link(request, names[-1], n)} if more and names else {}
    return web.json_response({"repositories": names}, headers=headers)
