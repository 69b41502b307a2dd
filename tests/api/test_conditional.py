"""Conditional and range headers on blob GETs, the same whichever way the blob is sent: cold (streamed while it
is fetched), from a cached file (sendfile), or from memory (small blobs). Every error has a registry body."""

from __future__ import annotations

import pytest

from tests.conftest import MirrorClient
from tests.fakes.registry import FakeRegistry

DIGEST = "{digest}"  # replaced by the blob's digest
PAST = "Mon, 01 Jan 2001 00:00:00 GMT"
FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"

CASES = [
    pytest.param({"Range": "bytes=²-"}, 416, id="Range bytes=²- -> 416 RANGE_INVALID"),
    pytest.param({"Range": "bytes=٣-"}, 416, id="Range with a non-ASCII digit -> 416 RANGE_INVALID"),
    pytest.param({"Range": "bytes=0-٣"}, 416, id="non-ASCII digit as the end -> 416 RANGE_INVALID"),
    pytest.param({"If-Match": '"sha256:other"'}, 200, id="If-Match is ignored on immutable blobs -> 200"),
    pytest.param({"If-Unmodified-Since": PAST}, 200, id="If-Unmodified-Since is ignored -> 200"),
    pytest.param({"Range": "bytes=2-", "If-Range": '"sha256:other"'}, 200, id="If-Range other ETag -> full 200"),
    pytest.param({"Range": "bytes=2-", "If-Range": f'W/"{DIGEST}"'}, 200, id="If-Range weak ETag -> full 200"),
    pytest.param({"Range": "bytes=2-", "If-Range": FUTURE}, 200, id="If-Range date -> full 200"),
    pytest.param({"Range": "bytes=2-", "If-Range": f'"{DIGEST}"'}, 206, id="If-Range the digest -> 206"),
]


@pytest.mark.parametrize("source", ["cold", "file", "memory"])
@pytest.mark.parametrize(("headers", "status"), CASES)
async def test_blob_conditionals(
    mirror_and_fake: tuple[MirrorClient, FakeRegistry], source: str, headers: dict[str, str], status: int
) -> None:
    mirror, fake = mirror_and_fake
    data = bytes(range(256)) * (8 if source == "memory" else 1024)  # memory: small enough to be held there
    digest = fake.add_blob(data)
    url = f"/v2/alpine/blobs/{digest}"
    if source != "cold":
        assert await (await mirror.get(url)).read() == data
    resp = await mirror.get(url, headers={k: v.replace(DIGEST, digest) for k, v in headers.items()})
    assert resp.status == status
    if status == 416:
        assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
        assert (await resp.json())["errors"][0]["code"] == "RANGE_INVALID"
    elif status == 206:
        assert resp.headers["Content-Range"] == f"bytes 2-{len(data) - 1}/{len(data)}"
        assert await resp.read() == data[2:]
    else:
        assert "Content-Range" not in resp.headers
        assert await resp.read() == data
