"""``GET /v2/_catalog`` with ``n``/``last`` pagination (OCI distribution spec, "Listing repositories"; Docker
registry API): the local (pushed) repositories. Pulled-through repositories are a cache, not a catalog."""

from __future__ import annotations

from aiohttp import web

from mirror.api.keys import LOCAL
from mirror.api.listing import next_link, parse_page


async def catalog(request: web.Request) -> web.Response:
    n, last = parse_page(request)
    names, more = request.app[LOCAL].catalog(n, last)
    headers = {"Link": next_link(request, names[-1], n)} if more and names else {}
    return web.json_response({"repositories": names}, headers=headers)
