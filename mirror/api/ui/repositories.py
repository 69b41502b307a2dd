"""The repository pages: the list (``GET /ui/repositories?q=&after=``), one repository
(``GET /ui/repositories/<registry>/<path>``) and one image (``GET /ui/images/<registry>/<path>?digest=``).

A repository is named on these pages as the index keys it: ``docker.io/library/alpine`` (pulled through from
that upstream) or ``local/team/app`` (pushed here). A name the caller may not pull (``Access.may``, with the name
a client would use) is left out of the list and its pages are the 404 page, the same as a name that does not
exist, so a pushed repository's name never reaches a caller who could not pull it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from mirror import browse
from mirror.api.access import ACTOR
from mirror.api.admin import ADMIN
from mirror.api.keys import ACCESS
from mirror.api.ui import SETTINGS, missing, page
from mirror.oci.errors import RegistryError
from mirror.oci.reference import LOCAL, Digest, Repo, Tag, format_image_ref, validate_name
from mirror.permissions import Action

MAX_QUERY = 200  # characters of a search string (or a page cursor) that are read


def _visible(request: web.Request) -> Callable[[Repo], bool]:
    access, actor = request.app[ACCESS], request.get(ACTOR)
    default = request.app[SETTINGS].default_registry
    return lambda repo: access.may(actor, Action.PULL, browse.client_name(repo, default))


async def repositories(request: web.Request) -> web.Response:
    search = request.query.get("q", "")[:MAX_QUERY]
    after = request.query.get("after", "")[:MAX_QUERY]
    index, visible = request.app[ADMIN].index, _visible(request)
    default = request.app[SETTINGS].default_registry

    def rows() -> tuple[list[dict[str, Any]], str | None]:
        found = browse.repositories(index, search, after, visible)
        return [
            {
                "name": str(repo),
                "client": browse.client_name(repo, default),
                "local": repo.registry == LOCAL,
                "registry": repo.registry,
                "tags": len(index.list_tags_sync(repo)),
            }
            for repo in found.items
        ], found.after

    shown, more = await asyncio.to_thread(rows)
    context = {"page": "repositories", "q": search, "after": after, "repos": shown, "more": more}
    return page("repositories.html", request, context)


def _repo(request: web.Request) -> Repo | None:
    """The repository named in the path, or None when the name is not one (the caller gets the 404 page)."""
    registry, _, path = request.match_info["name"].partition("/")
    try:
        return Repo(registry, validate_name(path)) if registry and path else None
    except RegistryError:
        return None


async def _known(request: web.Request, repo: Repo | None) -> Repo | None:
    if repo is None or not _visible(request)(repo):
        return None
    known = await asyncio.to_thread(request.app[ADMIN].index.repository_known_sync, repo)
    return repo if known else None


def commands(request: web.Request, repo: Repo, ref: str) -> dict[str, str]:
    """The pull commands of ``ref`` (":tag" or "@digest") through this mirror, as the browser reached it."""
    client = browse.client_name(repo, request.app[SETTINGS].default_registry)
    image = f"{request.host}/{client}{ref}"
    plain = request.scheme == "http"
    return {
        "docker": f"docker pull {image}",
        "podman": f"podman pull {'--tls-verify=false ' if plain else ''}{image}",
        "ctr": f"ctr image pull {'--plain-http ' if plain else ''}{image}",
    }


async def repository(request: web.Request) -> web.Response:
    repo = await _known(request, _repo(request))
    if repo is None:
        return await missing(request)
    admin = request.app[ADMIN]
    after = request.query.get("after", "")[:MAX_QUERY]
    pins = await admin.pins()
    pinned = {*pins["pins"], *pins["config_pins"]}
    found = await asyncio.to_thread(browse.tags, admin.store, admin.index, admin.usage.table, pinned, repo, after)
    rows = []
    for item in found.items:
        ref = format_image_ref(repo, Tag.parse(item["tag"]))
        rows.append({**item, "ref": ref, "commands": commands(request, repo, f":{item['tag']}")})
    context = {
        "page": "repositories",
        "repo": str(repo),
        "local": repo.registry == LOCAL,
        "tags": rows,
        "more": found.after,
        "after": after,
    }
    return page("repository.html", request, context)


async def image(request: web.Request) -> web.Response:
    repo = await _known(request, _repo(request))
    try:
        digest = Digest.parse(request.query.get("digest", ""))
    except RegistryError:
        return await missing(request)
    admin = request.app[ADMIN]
    if repo is None or not await asyncio.to_thread(browse.belongs, admin.index, repo, digest):
        return await missing(request)
    tree = await asyncio.to_thread(browse.tree, admin.store, admin.index, admin.usage.table, repo, digest)
    context = {
        "page": "repositories",
        "repo": str(repo),
        "tree": tree,
        "commands": commands(request, repo, f"@{digest}"),
    }
    return page("image.html", request, context)
