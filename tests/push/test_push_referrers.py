"""The OCI 1.1 referrers API: pushed manifests with a ``subject`` are listed for it (with ``artifactType``
filtering); for pulled-through repositories the upstream's answer is passed through."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mirror.app import create_app
from tests.conftest import MirrorClient, MirrorFactory
from tests.support.plain_http import OCI_INDEX, OCI_MANIFEST, sha256
from tests.support.pushing import (
    EMPTY_CONFIG,
    error_code,
    image_manifest,
    mirror_config,
    push_blob,
    push_image,
    push_manifest,
)

SBOM = "application/vnd.example.sbom.v1+json"
SBOM_QUERY = "?artifactType=" + quote(SBOM, safe="")  # clients encode the "+"
SIGNATURE = "application/vnd.example.signature.v1"


async def push_artifact(client: MirrorClient, subject: bytes, artifact_type: str, payload: bytes) -> tuple[str, Any]:
    """An artifact manifest (empty config, one layer) whose subject is ``subject``; returns (digest, response)."""
    await push_blob(client, "my/app", b"{}")
    await push_blob(client, "my/app", payload)
    body = image_manifest(
        b"{}",
        [payload],
        subject=(OCI_MANIFEST, len(subject), sha256(subject)),
        artifact_type=artifact_type,
        config_type=EMPTY_CONFIG,
        annotations={"org.example.kind": artifact_type.rsplit(".", 2)[-2]},
    )
    resp = await client.put(f"/v2/my/app/manifests/{sha256(body)}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert resp.status == 201, await resp.text()
    return sha256(body), resp


async def test_referrers_of_pushed_content(push_mirror: MirrorFactory) -> None:
    client = await push_mirror()
    image = await push_image(client, "my/app", "1.0", [b"layer"])
    sbom, resp = await push_artifact(client, image, SBOM, b"the sbom")
    assert resp.headers["OCI-Subject"] == sha256(image)
    signature, _ = await push_artifact(client, image, SIGNATURE, b"the signature")

    resp = await client.get(f"/v2/my/app/referrers/{sha256(image)}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in resp.headers
    index = await resp.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {m["digest"]: m for m in index["manifests"]}
    assert set(by_digest) == {sbom, signature}
    assert by_digest[sbom]["artifactType"] == SBOM
    assert by_digest[sbom]["mediaType"] == OCI_MANIFEST
    assert by_digest[sbom]["annotations"] == {"org.example.kind": "sbom"}

    resp = await client.get(f"/v2/my/app/referrers/{sha256(image)}{SBOM_QUERY}")
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in (await resp.json())["manifests"]] == [sbom]

    resp = await client.get(f"/v2/my/app/referrers/{sha256(image)}?artifactType=application/none")
    assert (await resp.json())["manifests"] == []

    assert (await client.delete(f"/v2/my/app/manifests/{sbom}")).status == 202
    resp = await client.get(f"/v2/my/app/referrers/{sha256(image)}")
    assert [m["digest"] for m in (await resp.json())["manifests"]] == [signature]


async def test_a_referrer_may_come_before_its_subject(push_mirror: MirrorFactory) -> None:
    client = await push_mirror()
    future_subject = b'{"not": "pushed yet"}'
    digest, resp = await push_artifact(client, future_subject, SBOM, b"early sbom")
    assert resp.headers["OCI-Subject"] == sha256(future_subject)
    resp = await client.get(f"/v2/my/app/referrers/{sha256(future_subject)}")
    assert [m["digest"] for m in (await resp.json())["manifests"]] == [digest]


async def test_image_without_artifact_type_is_listed_with_its_config_type(push_mirror: MirrorFactory) -> None:
    client = await push_mirror()
    image = await push_image(client, "my/app", "1.0", [b"layer"])
    config = b'{"kind": "attestation"}'
    await push_blob(client, "my/app", config)
    body = image_manifest(config, [], subject=(OCI_MANIFEST, len(image), sha256(image)), config_type=SIGNATURE)
    await push_manifest(client, "my/app", sha256(body), body)
    resp = await client.get(f"/v2/my/app/referrers/{sha256(image)}")
    assert [m["artifactType"] for m in (await resp.json())["manifests"]] == [SIGNATURE]


async def test_unknown_subject_has_no_referrers(push_mirror: MirrorFactory) -> None:
    client = await push_mirror()
    await push_image(client, "my/app", "1.0", [b"layer"])
    resp = await client.get(f"/v2/my/app/referrers/{sha256(b'nothing')}")
    assert resp.status == 200
    assert (await resp.json())["manifests"] == []


async def test_upstream_without_the_api_gives_404(push_mirror: MirrorFactory) -> None:
    """The fake upstream, like Distribution 2.8, has no referrers endpoint: clients must see a 404 to fall back to
    the tag schema (``sha256-<hex>`` tags), which the mirror serves as ordinary tags."""
    client = await push_mirror()
    resp = await client.get(f"/v2/library/alpine/referrers/{sha256(b'x')}")
    assert resp.status == 404
    assert await error_code(resp) == "NOT_FOUND"


@pytest.mark.parametrize(
    ("upstream_filters", "query", "expected"),
    [
        pytest.param(False, "", ["a", "b"], id="pass-through -> upstream's list"),
        pytest.param(True, SBOM_QUERY, ["a"], id="upstream applied the filter -> passed through"),
        pytest.param(False, SBOM_QUERY, ["a"], id="upstream ignored the filter -> applied here"),
    ],
)
async def test_referrers_pass_through(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    tmp_path: Any,
    upstream_filters: bool,
    query: str,
    expected: list[str],
) -> None:
    """An upstream with the referrers API (Distribution 2.8 has none, so an in-process one shows it)."""
    seen: list[str] = []
    manifests = [
        {"mediaType": OCI_MANIFEST, "digest": sha256(b"a"), "size": 1, "artifactType": SBOM},
        {"mediaType": OCI_MANIFEST, "digest": sha256(b"b"), "size": 1, "artifactType": SIGNATURE},
    ]

    async def referrers(request: web.Request) -> web.Response:
        seen.append(request.query.get("artifactType", ""))
        wanted = request.query.get("artifactType")
        listed = [m for m in manifests if not (upstream_filters and wanted) or m["artifactType"] == wanted]
        headers = {"OCI-Filters-Applied": "artifactType"} if upstream_filters and wanted else {}
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed})
        return web.Response(text=body, content_type=OCI_INDEX, headers=headers)

    upstream = web.Application()
    upstream.router.add_get("/v2/{name:.+}/referrers/{digest}", referrers)
    server = await aiohttp_server(upstream)
    client = await aiohttp_client(create_app(mirror_config(tmp_path / "data", str(server.make_url("")))))
    subject = sha256(b"subject")
    resp = await client.get(f"/v2/library/alpine/referrers/{subject}{query}")
    assert resp.status == 200
    names = {sha256(b"a"): "a", sha256(b"b"): "b"}
    assert [names[m["digest"]] for m in (await resp.json())["manifests"]] == expected
    assert (resp.headers.get("OCI-Filters-Applied") == "artifactType") is bool(query)
    assert seen == [SBOM if query else ""]


async def test_empty_blob_and_manifest_without_layers(push_mirror: MirrorFactory) -> None:
    """The empty blob (a zero-length upload) and a manifest with no layers are valid pushes."""
    client = await push_mirror()
    digest = await push_blob(client, "my/app", b"")
    assert digest == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    resp = await client.get(f"/v2/my/app/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == b""
    body = image_manifest(b"", [], config_type=EMPTY_CONFIG)
    await push_manifest(client, "my/app", "empty", body)
