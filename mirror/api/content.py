"""Which service answers a read: local (pushed) repositories are answered by ``LocalRegistry``, everything else
by the pull-through service. Both offer the same read methods (``mirror.content.Content``), so handlers cannot
tell them apart.
"""

from __future__ import annotations

from aiohttp import web

from mirror.api.keys import LOCAL, PULL
from mirror.content import Content
from mirror.oci.reference import LOCAL as LOCAL_REGISTRY
from mirror.oci.reference import Repo


def content_for(app: web.Application, repo: Repo) -> Content:
    return app[LOCAL] if repo.registry == LOCAL_REGISTRY else app[PULL]
