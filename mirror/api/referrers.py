"""``GET /v2/<name>/referrers/<digest>`` (OCI distribution spec 1.1, "Listing Referrers"): an image index of the
manifests whose subject is ``<digest>``; ``?artifactType=`` filters (``OCI-Filters-Applied: artifactType``). A local
repository answers from pushed content, any other name from its upstream (filtered here if the upstream ignored
the filter).
"""

from __future__ import annotations

import json

from aiohttp import web

from mirror.api.keys import LOCAL, PULL, RESOLVE
from mirror.oci.mediatypes import OCI_INDEX
from mirror.oci.reference import LOCAL as LOCAL_REGISTRY
from mirror.oci.reference import Digest


async def get_referrers(request: web.Request) -> web.Response:
    repo = request.app[RESOLVE](request.match_info["name"], request.query.get("ns"))
    subject = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType") or None
    if repo.registry == LOCAL_REGISTRY:
        index = await request.app[LOCAL].referrers(repo, subject, artifact_type)
        filtered = artifact_type is not None
    else:
        index, filtered = await request.app[PULL].referrers(repo, subject, artifact_type)
        if artifact_type is not None and not filtered:  # the upstream ignored the filter: apply it here
            index["manifests"] = [m for m in index["manifests"] if m.get("artifactType") == artifact_type]
            filtered = True
    headers = {"Content-Type": OCI_INDEX}
    if filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=json.dumps(index).encode(), headers=headers)
