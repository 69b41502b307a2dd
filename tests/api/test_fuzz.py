"""Generated requests over the whole HTTP surface (hypothesis) against an in-process mirror.

The mirror runs with a data dir under ``tmp_path``, the admin API on, an htpasswd file, a fake upstream holding a
small image (pulled through once, so requests hit cached content), a pushed local repository with a referrer, and
open upload sessions. Requests are raw HTTP/1.1 (names with ``..``, ``%2e``, unicode, thousands of characters, any
method on any route, mismatched ``Content-Length``), built from the route table in ``mirror/api/routes.py``. Every answer
must be:

- below 500: the fake upstream never fails here, so no 5xx is legitimate (not even 502/503/504/507);
- for a 4xx, a registry error body ``{"errors": [{"code": ..., "message": ...}]}`` (HEAD answers have no body);
- prompt: each socket operation is bounded, a hang fails the example;
and afterwards nothing exists outside the data dir: no traversal (``../``, ``%2e%2e``, encoded slashes) in a
name, reference, digest or upload id reached the filesystem. With ``CI=true`` the examples are derandomized.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.app import create_app
from mirror.config import Config, UpstreamConfig
from tests.fakes.registry import OCI_INDEX, OCI_MANIFEST, FakeRegistry
from tests.support.plain_http import sha256
from tests.support.pushing import image_config, image_manifest
from tests.support.served import Answer, ServingThread, exchange

USER, PASSWORD = "fuzz", "secret"
MARK = "escape" + secrets.token_hex(4)  # the last component of every traversal attempt: found nowhere afterwards
TIMEOUT = 10.0
METHODS = ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE")
ARTIFACT = "application/vnd.example.sbom+json"
T = TypeVar("T")


def basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode()


VALID_AUTH = basic(f"{USER}:{PASSWORD}".encode())


@dataclass
class World:
    """What the mirror holds before the fuzzing starts: names, digests and bodies the strategies draw from."""

    port: int = 0
    digests: list[str] = field(default_factory=list)
    manifests: list[bytes] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)  # paths that answer 200 before the fuzzing starts


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # exact | long: promises 7 bytes more than it sends, then half-closes | chunked | none: no body, no length.
    # (Sending more than promised is not fuzzed: aiohttp's parser answers the stray bytes before any handler.)
    framing: str

    def raw(self) -> bytes:
        target = urllib.parse.quote(self.path, safe="/%:@!$&'()*+,;=~")
        if self.query:
            target += "?" + urllib.parse.urlencode(self.query, quote_via=urllib.parse.quote)
        lines = [f"{self.method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        body = self.body
        if self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
            body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        elif self.framing == "none":
            body = b""
        else:
            lines.append(f"Content-Length: {len(body) + (7 if self.framing == 'long' else 0)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def request_to(target: tuple[str, str], **rest: Any) -> Request:
    return Request(*target, **rest)


# --- strategies -----------------------------------------------------------------------------------------------------
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=24)
traversals = st.sampled_from(
    [f"../{MARK}", f"../../{MARK}", f"../../../../../../../../tmp/{MARK}", f"%2e%2e/%2e%2e/{MARK}",
     f"..%2f..%2f{MARK}", f"%2E%2E%2F{MARK}", f"....//{MARK}", f"..\\..\\{MARK}", f"/{MARK}"]
)  # fmt: skip
known_names = st.sampled_from(["library/alpine", "alpine", "my/app", "docker.io/library/alpine", "my/new"])


def often(likely: st.SearchStrategy[T], other: st.SearchStrategy[T], quarters: int) -> st.SearchStrategy[T]:
    """``likely`` in about ``quarters`` of four draws (``one_of`` weighs branches alike and merges repeated ones)."""
    return st.integers(0, 3).flatmap(lambda i: likely if i < quarters else other)


odd_names = st.one_of(
    st.sampled_from(
        ["..", "%2e%2e", "a/../b", "a/./b", "./a", "a//b", "a/", "_catalog", "Alpine", "ä", "名前/镜像", "-a",
         "a..b", "a__b", "%00", "a%2fb", "a" * 256, "a/" * 120 + "b", "library/" + "x" * 4000, "v2", "blobs"]
    ),
    traversals,
    st.lists(st.one_of(st.sampled_from(["..", ".", "%2e", "a", "library", "x-y", "a_b", "", MARK]), text),
             min_size=1, max_size=5).map("/".join),
)  # fmt: skip
names = often(known_names, odd_names, 2)
unicode_digits = st.sampled_from(["²", "٣", "１０", "߁", "৪", "⁹", "𝟙"])
numbers = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "-0", "+1", "00", "1e3", "1.5", " 1", "0x10", "", "9" * 40]),
    unicode_digits,
    st.integers(-(10**30), 10**30).map(str),
)


def route(methods: tuple[str, ...], paths: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, str]]:
    """(method, path): mostly a method the route serves, sometimes any (405s, and routes that share a path)."""
    return st.tuples(often(st.sampled_from(methods), st.sampled_from(METHODS), 3), paths)


def strategies(world: World) -> st.SearchStrategy[Request]:
    known_digests = st.sampled_from(world.digests)
    odd_digests = st.one_of(
        st.sampled_from(["sha256:" + "0" * 64, "sha256:" + "A" * 64, "sha256:abc", "sha256:", "sha512:" + "a" * 128,
                         "sha384:" + "b" * 96, "md5:" + "c" * 32, "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g",
                         "sha256:" + "٣" * 64, "sha256:" + "g" * 64, ":" + "a" * 64, "sha256:" + "a" * 65]),
        st.text("0123456789abcdef", min_size=60, max_size=68).map(lambda h: "sha256:" + h),
        text,
        traversals,
    )  # fmt: skip
    digests = often(known_digests, odd_digests, 2)
    references = st.one_of(
        st.sampled_from(["3.19", "latest", "1.0", "multi"]),
        st.sampled_from(["v" * 128, "v" * 129, ".INVALID", "-bad", "a:b", "..", "%2e%2e", f"..%2f{MARK}"]),
        digests,
        text,
    )
    open_uploads = st.sampled_from(world.uploads)
    uuids = often(open_uploads, st.one_of(st.uuids().map(str), text, traversals), 2)
    # Half the requests ask for content that exists (a quarter for blobs), so conditional and Range headers meet
    # real answers (small blobs from memory, larger ones from files); the other half go anywhere.
    blob_paths = [path for path in world.content if "/blobs/" in path]
    content = st.one_of(
        route(("GET", "GET", "HEAD"), st.sampled_from(blob_paths)),
        route(("GET", "GET", "HEAD"), st.sampled_from(world.content)),
    )
    anywhere = st.one_of(
        route(("GET",), st.sampled_from(["/v2/", "/v2", "/healthz", "/metrics", "/readyz", "/v2/_catalog", "/",
                                         "/v2/_catalog/x", "/v2//", "/v2/%2e%2e/", "/admin/v1"])),
        route(("GET",), st.sampled_from(["stats", "ls", "pins", "evict", "", "nope"]).map("/admin/v1/{}".format)),
        route(("PUT", "DELETE"), st.just("/admin/v1/pins")),
        route(("POST",), st.sampled_from(["evict", "gc", "verify", "prefetch", "stats/x"]).map("/admin/v1/{}".format)),
        route(("GET", "HEAD", "PUT", "DELETE"), st.builds("/v2/{}/manifests/{}".format, names, references)),
        route(("GET", "HEAD", "DELETE"), st.builds("/v2/{}/blobs/{}".format, names, digests)),
        route(("GET",), st.builds("/v2/{}/tags/list".format, names)),
        route(("POST",), st.builds("/v2/{}/blobs/uploads/".format, names)),
        route(("PATCH", "PUT", "GET", "DELETE"), st.builds("/v2/{}/blobs/uploads/{}".format, names, uuids)),
        route(("GET",), st.builds("/v2/{}/referrers/{}".format, names, digests)),
        route(METHODS, text.map(lambda t: "/" + t)),
    )  # fmt: skip
    paths = often(content, anywhere, 2)
    query_values = st.one_of(
        numbers,
        text,
        digests,
        st.sampled_from(["docker.io", "ghcr.io", "localhost:5000", "library/alpine", "alpine:3.19", "my/app:1.0",
                         "my/app", ARTIFACT, "true", "1", f"../../{MARK}"]),
    )  # fmt: skip
    keys = st.sampled_from(["n", "last", "ns", "artifactType", "digest", "mount", "from", "image", "dry_run", "x"])
    query = st.lists(st.tuples(keys, query_values), max_size=4, unique_by=lambda kv: kv[0]).map(tuple)
    return st.builds(
        request_to,
        paths,
        query=query,
        headers=headers(digests),
        body=bodies(world),
        framing=st.sampled_from(["exact", "exact", "exact", "long", "chunked", "none"]),
    )


def headers(digests: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    byte = st.integers(-5, 10**20).map(str) | unicode_digits | st.just("")
    ranges = st.one_of(
        st.sampled_from(["bytes=0-0", "bytes=0-10", "bytes=5-", "bytes=-5", "bytes=-0", "bytes=10-0", "bytes=0-1,3-4",
                         "bytes=٣-", "bytes=²-5", "bytes=", "bytes=-", "items=0-1", "bytes = 0-1", "bytes=a-b"]),
        st.builds("bytes={}-{}".format, byte, byte),
    )  # fmt: skip
    content_ranges = st.one_of(
        st.sampled_from(["0-10", "bytes 0-10/20", "0-", "-1", "5-2", "0-0", "٣-٤", "²-³", "*/10", "x"]),
        st.builds("{}-{}".format, byte, byte),
    )
    etags = st.one_of(digests, digests.map(lambda d: f'"{d}"'), st.sampled_from(["*", 'W/"x"', '"a", "b"', ""]))
    dates = st.sampled_from(["Mon, 01 Jan 2024 00:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 GMT", "yesterday", "",
                             "Fri, 31 Dec 9999 23:59:59 GMT", "٣"])  # fmt: skip
    auth = st.sampled_from(
        ["Basic", "Basic ", "Basic !!!", "Bearer x", "Digest a=b", "basic " + VALID_AUTH[6:], basic(b"fuzz:wrong"),
         basic(b"nocolon"), basic(b":"), basic("ä:ö".encode("latin-1")), basic(b"\xff\xfe:\x00"),
         basic(f"{USER}:{PASSWORD}:extra".encode())]
    )  # fmt: skip
    content_types = st.sampled_from(
        [OCI_MANIFEST, OCI_INDEX, "application/vnd.docker.distribution.manifest.v2+json", "application/json",
         "application/octet-stream", "", "text/plain; charset=ä", "x/" + "y" * 300]
    )  # fmt: skip
    accepts = st.sampled_from(
        [OCI_MANIFEST, OCI_INDEX, "*/*", "", "application/vnd.docker.distribution.manifest.v1+json"]
    )
    optional = {
        "Range": ranges, "If-None-Match": etags, "If-Match": etags, "If-Range": etags | dates,
        "If-Modified-Since": dates, "If-Unmodified-Since": dates, "Content-Range": content_ranges,
        "Content-Type": content_types, "Accept": accepts,
    }  # fmt: skip
    # A few headers at a time (with all of them, nearly every request would fail on one), and mostly valid
    # credentials (anything else is a 401 before the interesting code).
    some = st.lists(
        st.one_of([st.tuples(st.just(name), values) for name, values in optional.items()]),
        max_size=3,
        unique_by=lambda header: header[0],
    )
    credentials = st.one_of(st.none(), st.just(VALID_AUTH), st.just(VALID_AUTH), st.just(VALID_AUTH), auth)
    return st.builds(with_credentials, some, credentials)


def with_credentials(chosen: list[tuple[str, str]], authorization: str | None) -> tuple[tuple[str, str], ...]:
    return (*chosen, ("Authorization", authorization)) if authorization else tuple(chosen)


def bodies(world: World) -> st.SearchStrategy[bytes]:
    prefetch = st.lists(st.sampled_from(["alpine:3.19", "library/alpine:multi", "my/app:1.0", "x", f"../../{MARK}"]))
    return st.one_of(
        st.just(b""),
        st.binary(max_size=128),
        st.sampled_from(world.manifests),
        st.sampled_from([b"{}", b"[]", b"null", b'{"schemaVersion": 2}', b'{"images": "x"}', b"\xff"]),
        prefetch.map(lambda images: json.dumps({"images": images, "platforms": ["linux/amd64"]}).encode()),
    )


# --- the mirror under test -------------------------------------------------------------------------------------------
def seed(fake: FakeRegistry, world: World) -> None:
    """Content in the fake upstream; recorded in ``world`` (``populate`` pulls it through)."""
    # One small layer (answered from memory) and one past SMALL_BLOB (64 KiB: answered from the file).
    alpine = fake.add_image("library/alpine", "3.19", [b"alpine layer " * 64, bytes(range(256)) * 400])
    index = fake.add_index("library/alpine", "multi", {"amd64": alpine})
    world.digests += [alpine, index, *fake.blobs]
    world.manifests += [body for _, body in fake.manifests.values()]
    world.content += [f"/v2/library/alpine/manifests/{ref}" for ref in ("3.19", "multi", alpine, index)]
    world.content += [f"/v2/library/alpine/blobs/{digest}" for digest in fake.blobs]
    world.content.append("/v2/library/alpine/tags/list")


def request(world: World, method: str, path: str, body: bytes = b"", **headers: str) -> Answer:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return exchange(world.port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body, TIMEOUT)


def populate(world: World) -> None:
    """Push ``my/app:1.0`` with a referrer, pull ``library/alpine`` through, open upload sessions."""
    config, layer, big = image_config(), b"my layer " * 64, bytes(range(255, -1, -1)) * 400
    for blob in (config, layer, big):
        answer = request(
            world, "POST", f"/v2/my/app/blobs/uploads/?digest={sha256(blob)}", blob, Authorization=VALID_AUTH
        )
        assert answer.status == 201, answer.body
    manifest = image_manifest(config, [layer, big])
    referrer = image_manifest(config, [layer], subject=(OCI_MANIFEST, len(manifest), sha256(manifest)),
                              artifact_type=ARTIFACT)  # fmt: skip
    for ref, body in (("1.0", manifest), (sha256(referrer), referrer)):
        answer = request(world, "PUT", f"/v2/my/app/manifests/{ref}", body, Content_Type=OCI_MANIFEST,
                         Authorization=VALID_AUTH)  # fmt: skip
        assert answer.status == 201, answer.body
    world.digests += [sha256(blob) for blob in (config, layer, big, manifest, referrer)]
    world.manifests += [manifest, referrer]
    world.content += [f"/v2/my/app/manifests/{ref}" for ref in ("1.0", sha256(manifest), sha256(referrer))]
    world.content += [f"/v2/my/app/blobs/{sha256(blob)}" for blob in (config, layer, big)]
    world.content += ["/v2/my/app/tags/list", f"/v2/my/app/referrers/{sha256(manifest)}"]
    for path in world.content:
        answer = request(world, "GET", path, Accept=f"{OCI_MANIFEST}, {OCI_INDEX}")
        assert answer.status == 200, (path, answer.body)
    for _ in range(4):
        answer = request(world, "POST", "/v2/my/app/blobs/uploads/", Authorization=VALID_AUTH)
        assert answer.status == 202, answer.body
        world.uploads.append(answer.headers["Location"].rsplit("/", 1)[1].split("?", 1)[0])


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[World, Path, set[str]]]:
    """The mirror, populated; its data dir; the names beside ``tmp_path`` before it started."""
    siblings = set(os.listdir(tmp_path.parent))
    data_dir = tmp_path / "srv" / "data"
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)) + b"\n")
    world, fake = World(), FakeRegistry()
    seed(fake, world)
    served = ServingThread()
    try:
        upstream = served.serve(fake.app)
        config = Config(
            data_dir=data_dir,
            upstreams=(UpstreamConfig(registry="docker.io", url=f"http://127.0.0.1:{upstream}", default=True,
                                      timeout=2.0),),
            admin_api=True,
            htpasswd=htpasswd,
        )  # fmt: skip
        world.port = served.serve(lambda: create_app(config))
        populate(world)
        yield world, data_dir, siblings
    finally:
        served.close()


# --- the checks ------------------------------------------------------------------------------------------------------
def problems(req: Request, answer: Answer) -> list[str]:
    """What is wrong with ``answer`` to ``req`` (nothing: an empty list)."""
    found = []
    if answer.status >= 500:
        found.append(f"{answer.status} (a server error)")
    if 400 <= answer.status < 500 and req.method != "HEAD":
        try:
            errors = json.loads(answer.body)["errors"]
            assert errors and all(isinstance(e["code"], str) and isinstance(e["message"], str) for e in errors)
        except (ValueError, KeyError, TypeError, AssertionError):
            found.append(f"{answer.status} without a registry error body: {answer.body[:200]!r}")
    return found


def send(world: World, req: Request) -> Answer | None:
    """The answer to ``req``; None when a client that broke its own framing is dropped (a fair answer to it)."""
    try:
        return exchange(world.port, req.raw(), TIMEOUT, half_close=req.framing == "long")
    except TimeoutError:
        raise AssertionError(f"no answer within {TIMEOUT} s (a hang)") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        if req.framing == "long":
            return None
        raise AssertionError(f"connection dropped without an answer: {exc!r}") from None


def outside(data_dir: Path, tmp_path: Path, siblings: set[str]) -> list[str]:
    """Entries written outside the data dir: anything new under ``tmp_path`` (the data dir's two parents) or beside
    it, and anything named with ``MARK`` in any ancestor of the data dir (where a traversal lands), in the cwd, or
    in the data dir itself (names and references never become paths there: only digests and server-made ids)."""
    expected = {tmp_path / "htpasswd", tmp_path / "srv", data_dir}
    found = [str(p) for p in tmp_path.rglob("*") if p not in expected and data_dir not in p.parents]
    found += [name for name in os.listdir(tmp_path.parent) if name not in siblings | {tmp_path.name}]
    for directory in (*data_dir.parents, Path.cwd()):
        found += [str(directory / name) for name in os.listdir(directory) if MARK in name]
    found += [str(p) for p in data_dir.rglob(f"*{MARK}*")]
    return found


def test_fuzz_http_surface(mirror: tuple[World, Path, set[str]], tmp_path: Path) -> None:
    world, data_dir, siblings = mirror

    @settings(
        max_examples=500,
        deadline=None,
        derandomize=os.environ.get("CI") == "true",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategies(world))
    def fuzz(req: Request) -> None:
        answer = send(world, req)
        if answer is not None:
            assert not problems(req, answer), (problems(req, answer), req)

    fuzz()
    assert outside(data_dir, tmp_path, siblings) == []
