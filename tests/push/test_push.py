"""The push side of the OCI distribution spec, request by request: uploads (monolithic, POST+PUT, chunked,
streamed), mounts, blob existence, manifest PUT validation, deletes, the catalog and tag lists, with the error
code of every bad request. In-process: a real aiohttp server around ``create_app``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MirrorClient, MirrorFactory
from tests.support.plain_http import OCI_INDEX, OCI_MANIFEST, sha256
from tests.support.pushing import (
    DOCKER_MANIFEST,
    error_code,
    image_config,
    image_index,
    image_manifest,
    push_blob,
    push_image,
    push_manifest,
)

REPO = "my/app"
LAYER = b"layer bytes " * 100
MISSING = sha256(b"never pushed")


@dataclass
class Pushed:
    client: MirrorClient
    layer: str  # digest of a pushed layer
    manifest: bytes
    digest: str  # digest of the manifest tagged 1.0
    session: str  # an upload session of my/app holding b"abc"
    data_dir: Path


@pytest.fixture
async def pushed(push_mirror: MirrorFactory, tmp_path: Path) -> Pushed:
    client = await push_mirror()
    manifest = await push_image(client, REPO, "1.0", [LAYER])
    resp = await client.post(f"/v2/{REPO}/blobs/uploads/")
    session = resp.headers["Docker-Upload-UUID"]
    resp = await client.patch(resp.headers["Location"], data=b"abc", headers={"Content-Range": "0-2"})
    assert resp.status == 202
    return Pushed(client, sha256(LAYER), manifest, sha256(manifest), session, tmp_path / "data")


def fill(text: str, p: Pushed) -> str:
    return text.format(
        repo=REPO, layer=p.layer, missing=MISSING, session=p.session, digest=p.digest, abc=sha256(b"abc"),
        abcdef=sha256(b"abcdef"),
    )  # fmt: skip


CASES = [
    # --- uploads -------------------------------------------------------------------------------------------------
    ("POST", "/v2/{repo}/blobs/uploads/", {}, b"", 202, None, {"Range": "0-0"}, "POST -> 202 session with Location"),
    ("POST", "/v2/{repo}/blobs/uploads/?digest={abc}", {}, b"abc", 201, None,
     {"Location": "/v2/{repo}/blobs/{abc}", "Docker-Content-Digest": "{abc}"}, "monolithic POST -> 201"),
    ("POST", "/v2/{repo}/blobs/uploads/?digest={missing}", {}, b"abc", 400, "DIGEST_INVALID", {},
     "monolithic POST with wrong digest -> 400 DIGEST_INVALID"),
    ("POST", "/v2/{repo}/blobs/uploads/?digest=sha256:xyz", {}, b"abc", 400, "DIGEST_INVALID", {},
     "monolithic POST with malformed digest -> 400 DIGEST_INVALID"),
    ("POST", "/v2/other/repo/blobs/uploads/?mount={layer}&from={repo}", {}, b"", 201, None,
     {"Location": "/v2/other/repo/blobs/{layer}", "Docker-Content-Digest": "{layer}"},
     "mount of a stored blob -> 201"),
    ("POST", "/v2/other/repo/blobs/uploads/?mount={missing}&from={repo}", {}, b"", 202, None, {"Range": "0-0"},
     "mount of an unknown blob -> 202 upload session"),
    ("PATCH", "/v2/{repo}/blobs/uploads/{session}", {"Content-Range": "3-5"}, b"def", 202, None,
     {"Range": "0-5", "Docker-Upload-UUID": "{session}", "Location": "/v2/{repo}/blobs/uploads/{session}"},
     "PATCH next chunk in order -> 202 Range 0-5"),
    ("PATCH", "/v2/{repo}/blobs/uploads/{session}", {"Content-Range": "0-2"}, b"abc", 416, "RANGE_INVALID",
     {"Range": "0-2"}, "PATCH chunk out of order -> 416 with the current Range"),
    ("PATCH", "/v2/{repo}/blobs/uploads/{session}", {"Content-Range": "5-7"}, b"xyz", 416, "RANGE_INVALID", {},
     "PATCH chunk leaving a gap -> 416"),
    ("PATCH", "/v2/{repo}/blobs/uploads/{session}", {"Content-Range": "three-five"}, b"def", 400,
     "BLOB_UPLOAD_INVALID", {}, "PATCH malformed Content-Range -> 400 BLOB_UPLOAD_INVALID"),
    ("PATCH", "/v2/{repo}/blobs/uploads/{session}", {"Content-Range": "3-9"}, b"def", 400, "SIZE_INVALID", {},
     "PATCH Content-Range longer than the body -> 400 SIZE_INVALID"),
    ("PATCH", "/v2/{repo}/blobs/uploads/{session}", {}, b"defgh", 202, None, {"Range": "0-7"},
     "PATCH streamed without Content-Range -> 202 appended"),
    ("PATCH", "/v2/{repo}/blobs/uploads/0b5e8f1c-7d2a-4c3b-9e4f-5a6b7c8d9e0f", {}, b"x", 404,
     "BLOB_UPLOAD_UNKNOWN", {}, "PATCH unknown session -> 404 BLOB_UPLOAD_UNKNOWN"),
    ("PATCH", "/v2/{repo}/blobs/uploads/not-a-session", {}, b"x", 404, "BLOB_UPLOAD_UNKNOWN", {},
     "PATCH malformed session id -> 404 BLOB_UPLOAD_UNKNOWN"),
    ("PATCH", "/v2/other/repo/blobs/uploads/{session}", {}, b"x", 404, "BLOB_UPLOAD_UNKNOWN", {},
     "PATCH a session of another repository -> 404 BLOB_UPLOAD_UNKNOWN"),
    ("GET", "/v2/{repo}/blobs/uploads/{session}", {}, b"", 204, None,
     {"Range": "0-2", "Docker-Upload-UUID": "{session}"}, "GET upload status -> 204 with Range"),
    ("GET", "/v2/{repo}/blobs/uploads/0b5e8f1c-7d2a-4c3b-9e4f-5a6b7c8d9e0f", {}, b"", 404, "BLOB_UPLOAD_UNKNOWN",
     {}, "GET status of unknown session -> 404 BLOB_UPLOAD_UNKNOWN"),
    ("DELETE", "/v2/{repo}/blobs/uploads/{session}", {}, b"", 204, None, {}, "DELETE session -> 204 cancelled"),
    ("PUT", "/v2/{repo}/blobs/uploads/{session}?digest={abcdef}", {"Content-Range": "3-5"}, b"def", 201, None,
     {"Location": "/v2/{repo}/blobs/{abcdef}", "Docker-Content-Digest": "{abcdef}"},
     "PUT with the last chunk -> 201"),
    ("PUT", "/v2/{repo}/blobs/uploads/{session}?digest={abc}", {}, b"", 201, None, {},
     "PUT without a body completes what was sent -> 201"),
    ("PUT", "/v2/{repo}/blobs/uploads/{session}", {}, b"", 400, "DIGEST_INVALID", {},
     "PUT without digest parameter -> 400 DIGEST_INVALID"),
    ("PUT", "/v2/{repo}/blobs/uploads/{session}?digest={missing}", {}, b"", 400, "DIGEST_INVALID", {},
     "PUT with a digest that does not match -> 400 DIGEST_INVALID"),
    # --- blobs ---------------------------------------------------------------------------------------------------
    ("HEAD", "/v2/{repo}/blobs/{layer}", {}, b"", 200, None, {"Docker-Content-Digest": "{layer}"},
     "HEAD pushed blob -> 200 (Layer already exists)"),
    ("HEAD", "/v2/{repo}/blobs/{missing}", {}, b"", 404, None, {}, "HEAD unknown blob -> 404"),
    ("HEAD", "/v2/new/repo/blobs/{layer}", {}, b"", 200, None, {}, "HEAD stored blob for a repo not pushed yet -> 200"),
    ("GET", "/v2/{repo}/blobs/{layer}", {}, b"", 200, None, {"Docker-Content-Digest": "{layer}"},
     "GET pushed blob -> 200"),
    ("GET", "/v2/{repo}/blobs/{missing}", {}, b"", 404, "BLOB_UNKNOWN", {},
     "GET unknown blob of a local repo -> 404 BLOB_UNKNOWN (no upstream)"),
    ("DELETE", "/v2/{repo}/blobs/{layer}", {}, b"", 202, None, {}, "DELETE blob -> 202"),
    ("DELETE", "/v2/{repo}/blobs/{missing}", {}, b"", 404, "BLOB_UNKNOWN", {}, "DELETE unknown blob -> 404"),
    ("DELETE", "/v2/library/alpine/blobs/{layer}", {}, b"", 405, "UNSUPPORTED", {},
     "DELETE blob of a pulled-through repo -> 405 UNSUPPORTED"),
    # --- manifests -----------------------------------------------------------------------------------------------
    ("GET", "/v2/{repo}/manifests/1.0", {}, b"", 200, None,
     {"Docker-Content-Digest": "{digest}", "Content-Type": OCI_MANIFEST}, "GET pushed manifest by tag -> 200"),
    ("HEAD", "/v2/{repo}/manifests/{digest}", {}, b"", 200, None, {"Docker-Content-Digest": "{digest}"},
     "HEAD pushed manifest by digest -> 200"),
    ("GET", "/v2/{repo}/manifests/2.0", {}, b"", 404, "MANIFEST_UNKNOWN", {},
     "GET unknown tag of a local repo -> 404 MANIFEST_UNKNOWN (no upstream)"),
    ("GET", "/v2/{repo}/manifests/.INVALID_MANIFEST_NAME", {}, b"", 404, "MANIFEST_UNKNOWN", {},
     "GET malformed tag of a local repo -> 404 MANIFEST_UNKNOWN (conformance)"),
    ("HEAD", "/v2/{repo}/manifests/.INVALID_MANIFEST_NAME", {}, b"", 404, None, {},
     "HEAD malformed tag of a local repo -> 404"),
    ("DELETE", "/v2/{repo}/manifests/.INVALID_MANIFEST_NAME", {}, b"", 404, "MANIFEST_UNKNOWN", {},
     "DELETE malformed tag of a local repo -> 404 MANIFEST_UNKNOWN"),
    ("PUT", "/v2/{repo}/manifests/x", {"Content-Type": OCI_MANIFEST}, b"{not json", 400, "MANIFEST_INVALID", {},
     "PUT manifest that is not JSON -> 400 MANIFEST_INVALID"),
    ("PUT", "/v2/{repo}/manifests/x", {"Content-Type": OCI_MANIFEST}, b'{"schemaVersion": 2}', 400,
     "MANIFEST_INVALID", {}, "PUT manifest without config -> 400 MANIFEST_INVALID"),
    ("PUT", "/v2/{repo}/manifests/x", {"Content-Type": "application/vnd.example+json"}, b"{}", 400,
     "MANIFEST_INVALID", {}, "PUT manifest of unknown media type -> 400 MANIFEST_INVALID"),
    ("PUT", "/v2/{repo}/manifests/x", {"Content-Type": "application/vnd.docker.distribution.manifest.v1+json"},
     b'{"schemaVersion": 1, "fsLayers": []}', 400, "MANIFEST_INVALID", {},
     "PUT Docker schema 1 manifest -> 400 MANIFEST_INVALID"),
    ("PUT", "/v2/{repo}/manifests/{missing}", {"Content-Type": OCI_MANIFEST}, "MANIFEST", 400, "DIGEST_INVALID",
     {}, "PUT manifest under a digest it does not hash to -> 400 DIGEST_INVALID"),
    ("PUT", "/v2/{repo}/manifests/-bad-tag", {"Content-Type": OCI_MANIFEST}, "MANIFEST", 400, "MANIFEST_INVALID",
     {}, "PUT manifest under an invalid tag -> 400 MANIFEST_INVALID"),
    ("PUT", "/v2/{repo}/manifests/x", {"Content-Type": OCI_MANIFEST}, "DANGLING", 400, "MANIFEST_BLOB_UNKNOWN",
     {}, "PUT manifest whose layer was never pushed -> 400 MANIFEST_BLOB_UNKNOWN"),
    ("PUT", "/v2/{repo}/manifests/x", {"Content-Type": OCI_INDEX}, "DANGLING_INDEX", 400, "MANIFEST_BLOB_UNKNOWN",
     {}, "PUT index whose child was never pushed -> 400 MANIFEST_BLOB_UNKNOWN"),
    ("PUT", "/v2/{repo}/manifests/x", {"Content-Type": OCI_MANIFEST}, "HUGE", 413, "MANIFEST_INVALID", {},
     "PUT manifest over 4 MiB -> 413 MANIFEST_INVALID"),
    ("PUT", "/v2/{repo}/manifests/2.0", {"Content-Type": OCI_MANIFEST}, "MANIFEST", 201, None,
     {"Location": "/v2/{repo}/manifests/{digest}", "Docker-Content-Digest": "{digest}"},
     "PUT manifest by tag -> 201 Location + Docker-Content-Digest"),
    ("PUT", "/v2/{repo}/manifests/{digest}", {"Content-Type": OCI_MANIFEST}, "MANIFEST", 201, None, {},
     "PUT manifest by its digest -> 201"),
    ("PUT", "/v2/{repo}/manifests/2.0", {}, "MANIFEST", 201, None, {},
     "PUT manifest without Content-Type: media type from the body -> 201"),
    ("DELETE", "/v2/{repo}/manifests/{digest}", {}, b"", 202, None, {}, "DELETE manifest by digest -> 202"),
    ("DELETE", "/v2/{repo}/manifests/1.0", {}, b"", 202, None, {}, "DELETE tag -> 202"),
    ("DELETE", "/v2/{repo}/manifests/{missing}", {}, b"", 404, "MANIFEST_UNKNOWN", {},
     "DELETE unknown manifest -> 404 MANIFEST_UNKNOWN"),
    ("DELETE", "/v2/library/alpine/manifests/latest", {}, b"", 405, "UNSUPPORTED", {},
     "DELETE manifest of a pulled-through repo -> 405 UNSUPPORTED"),
    # --- names ---------------------------------------------------------------------------------------------------
    ("POST", "/v2/My/App/blobs/uploads/", {}, b"", 400, "NAME_INVALID", {}, "POST upper-case name -> 400 NAME_INVALID"),
    ("POST", "/v2/a..b/blobs/uploads/", {}, b"", 400, "NAME_INVALID", {}, "POST name with .. -> 400 NAME_INVALID"),
    ("PUT", "/v2/my/App/manifests/1", {"Content-Type": OCI_MANIFEST}, "MANIFEST", 400, "NAME_INVALID", {},
     "PUT manifest upper-case name -> 400 NAME_INVALID"),
    ("POST", "/v2/library/nginx/blobs/uploads/", {}, b"", 403, "DENIED", {},
     "POST to Docker Hub's library/ -> 403 DENIED"),
    ("POST", "/v2/docker.io/my/app/blobs/uploads/", {}, b"", 403, "DENIED", {},
     "POST to a name with a registry host -> 403 DENIED"),
    ("POST", "/v2/my/app/blobs/uploads/?ns=docker.io", {}, b"", 403, "DENIED", {},
     "POST with ?ns= (an upstream's repo) -> 403 DENIED"),
    ("PATCH", "/v2/my/app/blobs/uploads/{session}?ns=docker.io", {}, b"x", 404, "BLOB_UPLOAD_UNKNOWN", {},
     "PATCH with ?ns= -> 404 BLOB_UPLOAD_UNKNOWN"),
    # --- discovery -----------------------------------------------------------------------------------------------
    ("GET", "/v2/_catalog", {}, b"", 200, None, {}, "GET catalog -> 200"),
    ("GET", "/v2/_catalog?n=-1", {}, b"", 400, "PAGINATION_NUMBER_INVALID", {}, "GET catalog bad n -> 400"),
    ("GET", "/v2/{repo}/tags/list", {}, b"", 200, None, {}, "GET tags of a local repo -> 200"),
    ("GET", "/v2/{repo}/referrers/{digest}", {}, b"", 200, None, {"Content-Type": OCI_INDEX},
     "GET referrers -> 200 image index"),
    ("GET", "/v2/{repo}/referrers/sha256:nope", {}, b"", 400, "DIGEST_INVALID", {},
     "GET referrers of a malformed digest -> 400 DIGEST_INVALID"),
]  # fmt: skip


def special_body(body: bytes | str, p: Pushed) -> bytes:
    if isinstance(body, bytes):
        return body
    config = image_config()
    if body == "MANIFEST":
        return p.manifest
    if body == "DANGLING":
        return image_manifest(config, [b"never pushed"])
    if body == "DANGLING_INDEX":
        return image_index([(image_manifest(config, [b"another"]), "arm64")])
    if body == "HUGE":
        return b" " * (4 * 1024 * 1024 + 1)
    raise AssertionError(body)


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code", "expect"),
    [pytest.param(*case[:7], id=case[7]) for case in CASES],
)
async def test_protocol(
    pushed: Pushed,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | str,
    status: int,
    code: str | None,
    expect: dict[str, str],
) -> None:
    resp = await pushed.client.request(method, fill(path, pushed), headers=headers, data=special_body(body, pushed))
    assert resp.status == status, await resp.text()
    if code is not None:
        assert await error_code(resp) == code
    for name, value in expect.items():
        assert resp.headers.get(name) == fill(value, pushed), name
    if status >= 400 and method != "HEAD":
        assert resp.headers["Content-Type"].startswith("application/json")


async def test_failed_uploads_leave_nothing(pushed: Pushed) -> None:
    """Wrong digests, monolithic or at PUT, publish nothing; a PUT with a wrong digest ends the session."""
    client = pushed.client
    resp = await client.post(f"/v2/{REPO}/blobs/uploads/?digest={MISSING}", data=b"abc")
    assert resp.status == 400
    resp = await client.put(f"/v2/{REPO}/blobs/uploads/{pushed.session}?digest={MISSING}")
    assert resp.status == 400
    resp = await client.get(f"/v2/{REPO}/blobs/uploads/{pushed.session}")
    assert resp.status == 404
    for digest in (MISSING, sha256(b"abc")):
        assert (await client.head(f"/v2/{REPO}/blobs/{digest}")).status == 404
    assert not list((pushed.data_dir / "uploads").iterdir())
    assert not list((pushed.data_dir / "tmp").iterdir())


async def test_chunked_upload_end_to_end(push_mirror: MirrorFactory) -> None:
    """POST, three PATCH chunks following the Location each time, PUT: the blob is readable and linked."""
    client = await push_mirror()
    data = bytes(range(256)) * 1000
    resp = await client.post(f"/v2/{REPO}/blobs/uploads/")
    location = resp.headers["Location"]
    pieces = [data[:100_000], data[100_000:200_000], data[200_000:]]
    offset = 0
    for piece in pieces:
        end = offset + len(piece) - 1
        resp = await client.patch(location, data=piece, headers={"Content-Range": f"{offset}-{end}"})
        assert resp.status == 202
        assert resp.headers["Range"] == f"0-{end}"
        location = resp.headers["Location"]
        offset = end + 1
    resp = await client.put(f"{location}?digest={sha256(data)}")
    assert resp.status == 201
    resp = await client.get(f"/v2/{REPO}/blobs/{sha256(data)}")
    assert await resp.read() == data


async def test_streamed_patch_then_empty_put_as_docker_does(push_mirror: MirrorFactory) -> None:
    client = await push_mirror()
    data = b"x" * 300_000

    async def stream() -> Any:
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    resp = await client.post(f"/v2/{REPO}/blobs/uploads/")
    resp = await client.patch(resp.headers["Location"], data=stream())  # chunked transfer, no Content-Range
    assert resp.status == 202
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    resp = await client.put(f"{resp.headers['Location']}?digest={sha256(data)}")
    assert resp.status == 201
    assert (await client.head(f"/v2/{REPO}/blobs/{sha256(data)}")).headers["Content-Length"] == str(len(data))


async def test_sha512_digest_is_accepted(push_mirror: MirrorFactory) -> None:
    import hashlib

    client = await push_mirror()
    data = b"sha512 content"
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    resp = await client.post(f"/v2/{REPO}/blobs/uploads/")
    resp = await client.patch(resp.headers["Location"], data=data)
    resp = await client.put(f"{resp.headers['Location']}?digest={digest}")
    assert resp.status == 201, await resp.text()
    assert await (await client.get(f"/v2/{REPO}/blobs/{digest}")).read() == data


async def test_index_push_and_pull_by_digest(push_mirror: MirrorFactory) -> None:
    """A multi-arch index: children first (by digest), then the index under a tag."""
    client = await push_mirror()
    children = []
    for arch in ("amd64", "arm64"):
        config = image_config(arch)
        layer = f"layer for {arch}".encode()
        for blob in (config, layer):
            await push_blob(client, REPO, blob)
        body = image_manifest(config, [layer])
        await push_manifest(client, REPO, sha256(body), body)
        children.append((body, arch))
    index = image_index(children)
    digest = await push_manifest(client, REPO, "multi", index, OCI_INDEX)
    resp = await client.get(f"/v2/{REPO}/manifests/multi")
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert await resp.read() == index
    assert resp.headers["Docker-Content-Digest"] == digest
    for body, _ in children:
        resp = await client.get(f"/v2/{REPO}/manifests/{sha256(body)}")
        assert await resp.read() == body


async def test_docker_media_type_and_retag(push_mirror: MirrorFactory) -> None:
    client = await push_mirror()
    config = image_config()
    await push_blob(client, REPO, config)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(config),
                       "size": len(config)},
            "layers": [],
        }
    ).encode()  # fmt: skip
    await push_manifest(client, REPO, "a", body, DOCKER_MANIFEST)
    await push_manifest(client, REPO, "b", body, DOCKER_MANIFEST)
    resp = await client.get(f"/v2/{REPO}/tags/list")
    assert (await resp.json())["tags"] == ["a", "b"]
    resp = await client.head(f"/v2/{REPO}/manifests/b")
    assert resp.headers["Content-Type"] == DOCKER_MANIFEST


async def test_delete_manifest_removes_its_tags(pushed: Pushed) -> None:
    client = pushed.client
    await push_manifest(client, REPO, "latest", pushed.manifest)
    assert (await client.delete(f"/v2/{REPO}/manifests/{pushed.digest}")).status == 202
    for ref in ("1.0", "latest", pushed.digest):
        assert (await client.get(f"/v2/{REPO}/manifests/{ref}")).status == 404
    assert (await (await client.get(f"/v2/{REPO}/tags/list")).json())["tags"] == []


async def test_delete_tag_keeps_the_manifest(pushed: Pushed) -> None:
    client = pushed.client
    assert (await client.delete(f"/v2/{REPO}/manifests/1.0")).status == 202
    assert (await client.get(f"/v2/{REPO}/manifests/1.0")).status == 404
    assert (await client.get(f"/v2/{REPO}/manifests/{pushed.digest}")).status == 200


async def test_deleted_blob_is_gone_from_its_repo_only(pushed: Pushed) -> None:
    client = pushed.client
    resp = await client.post(f"/v2/other/repo/blobs/uploads/?mount={pushed.layer}&from={REPO}")
    assert resp.status == 201
    assert (await client.delete(f"/v2/{REPO}/blobs/{pushed.layer}")).status == 202
    assert (await client.get(f"/v2/{REPO}/blobs/{pushed.layer}")).status == 404
    assert (await client.head(f"/v2/{REPO}/blobs/{pushed.layer}")).status == 404
    assert (await client.get(f"/v2/other/repo/blobs/{pushed.layer}")).status == 200


@pytest.mark.parametrize(
    ("query", "names", "link"),
    [
        pytest.param("", ["a/one", "b/two", "c/three", "my/app"], None, id="catalog without n -> every local repo"),
        pytest.param("?n=2", ["a/one", "b/two"], "/v2/_catalog?last=b/two&n=2", id="catalog n=2 -> page + Link"),
        pytest.param("?n=2&last=b/two", ["c/three", "my/app"], None, id="catalog last page -> no Link"),
        pytest.param("?n=0", [], None, id="catalog n=0 -> empty"),
    ],
)
async def test_catalog_pagination(pushed: Pushed, query: str, names: list[str], link: str | None) -> None:
    for repo in ("c/three", "a/one", "b/two"):
        await push_blob(pushed.client, repo, repo.encode())
    resp = await pushed.client.get(f"/v2/_catalog{query}")
    assert (await resp.json())["repositories"] == names
    if link is None:
        assert "Link" not in resp.headers
    else:
        assert resp.headers["Link"].replace("%2F", "/") == f'<{link}>; rel="next"'


async def test_tags_list_pagination(pushed: Pushed) -> None:
    for tag in ("b", "a", "c"):
        await push_manifest(pushed.client, REPO, tag, pushed.manifest)
    resp = await pushed.client.get(f"/v2/{REPO}/tags/list?n=2")
    assert (await resp.json()) == {"name": REPO, "tags": ["1.0", "a"]}
    assert "last=a" in resp.headers["Link"]
    resp = await pushed.client.get(f"/v2/{REPO}/tags/list?n=2&last=a")
    assert (await resp.json())["tags"] == ["b", "c"]


async def test_concurrent_chunks_apply_one_at_a_time(push_mirror: MirrorFactory) -> None:
    """Two PATCHes claiming the same offset: one wins, the other gets 416; the session stays consistent."""
    import asyncio

    client = await push_mirror()
    resp = await client.post(f"/v2/{REPO}/blobs/uploads/")
    location = resp.headers["Location"]
    first, second = await asyncio.gather(
        client.patch(location, data=b"a" * 1000, headers={"Content-Range": "0-999"}),
        client.patch(location, data=b"b" * 1000, headers={"Content-Range": "0-999"}),
    )
    assert sorted([first.status, second.status]) == [202, 416]
    winner = b"a" * 1000 if first.status == 202 else b"b" * 1000
    resp = await client.put(f"{location}?digest={sha256(winner)}")
    assert resp.status == 201
