"""Pushes into ``mirror serve`` with ``[storage] backend = "s3"``: a real SeaweedFS bucket, skopeo pushing (its
uploads are chunked: POST, PATCH, PUT), a real Distribution upstream for the pulled-through content. Every pushed
blob and manifest becomes an object in the bucket only once verified; an abandoned or wrong upload leaves none;
mounts link what the bucket holds; deletes and gc, ``mirror verify`` and eviction work on the bucket, and eviction
never removes pushed content."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import re
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.storage.s3writer import PART_SIZE
from tests.support.clients import skopeo
from tests.support.ops import Mirror, blob_files, free_port, run_cli, start_registry, wait_until
from tests.support.plain_http import OCI_MANIFEST, exchange, pull, push_blob, push_random_image, sha256
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration
LIMIT = 2 * 2**20  # --cache-size of the eviction test
LAYER = 256 * 2**10


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    service, url = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield url, [push_random_image(url, f"library/app{i}", "latest", [os.urandom(LAYER)]) for i in range(8)]
    finally:
        service.stop()


class Bucketed:
    """A mirror's view of the bucket: its own prefix (each test's data dir reconciles with its prefix only)."""

    def __init__(self, seaweed: Seaweed, tmp_path: Path, extra: str = ""):
        self.seaweed = seaweed
        self.prefix = f"push-{secrets.token_hex(4)}/"
        self.config = tmp_path / "mirror.toml"
        self.config.write_text(
            f'[storage]\nbackend = "s3"\nendpoint_url = "{seaweed.endpoint_url}"\nbucket = "{seaweed.bucket}"\n'
            f'region = "{seaweed.region}"\nprefix = "{self.prefix}"\naccess_key = "{seaweed.access_key}"\n'
            f'secret_key = "{seaweed.secret_key}"\n{extra}'
        )
        self.data_dir = tmp_path / "data"

    def mirror(self, upstream: str, *flags: str, **kwargs: Any) -> Mirror:
        return Mirror(self.data_dir, upstream, "--config", str(self.config), *flags, **kwargs)

    def cli(self, command: str, check: bool = True) -> tuple[int, str]:
        result = run_cli(command, "--data-dir", str(self.data_dir), "--config", str(self.config), check=check)
        return result.returncode, result.stdout

    def key(self, digest: str) -> str:
        return f"{self.prefix}blobs/{digest.replace(':', '/')}"

    def objects(self) -> dict[str, int]:
        """Every object under the prefix (blobs/ and quarantine/), as the raw client lists it: key -> size."""
        listed = raw_client(self.seaweed.endpoint_url).list_objects_v2(Bucket=self.seaweed.bucket, Prefix=self.prefix)
        return {item["Key"]: item["Size"] for item in listed.get("Contents", [])}

    def blobs(self) -> dict[str, int]:
        """digest -> size of every object under blobs/."""
        start = len(self.prefix) + len("blobs/")
        return {k[start:].replace("/", ":", 1): v for k, v in self.objects().items() if k.startswith(self.key(""))}

    def multipart_uploads(self) -> list[str]:
        client = raw_client(self.seaweed.endpoint_url)
        listed = client.list_multipart_uploads(Bucket=self.seaweed.bucket, Prefix=self.prefix)
        return [upload["Key"] for upload in listed.get("Uploads", [])]


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def start_upload(url: str, repo: str) -> str:
    status, headers, body = exchange(url, "POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 202, body
    return headers["Location"]


def patch(url: str, location: str, data: bytes, start: int = 0) -> None:
    span = {"Content-Range": f"{start}-{start + len(data) - 1}", "Content-Type": "application/octet-stream"}
    status, _, body = exchange(url, "PATCH", location, data, span)
    assert status == 202, body


def layout_with(layout: Path, layers: list[bytes]) -> str:
    """An OCI image layout holding one image (tag ``1.0``) whose layers are tar+gzip of the given file contents."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return {"digest": sha256(data), "size": len(data)}

    tars = []
    for n, content in enumerate(layers):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(f"file{n}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        tars.append(buf.getvalue())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in tars]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(json.dumps(config).encode())},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(gzip.compress(t, 1, mtime=0))}
            for t in tars
        ],
    }
    top = put(json.dumps(manifest).encode())
    entry = {"mediaType": OCI_MANIFEST, **top, "annotations": {"org.opencontainers.image.ref.name": "1.0"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return str(top["digest"])


def test_skopeo_pushes_into_the_bucket_and_the_image_pulls_back(
    upstream: tuple[str, list[dict[str, Any]]], seaweed: Seaweed, tmp_path: Path
) -> None:
    """A layer of more than one part (read back into a multipart upload) and a small one; pulled back over HTTP
    with every digest checked, and by skopeo byte for byte."""
    bucket = Bucketed(seaweed, tmp_path)
    digest = layout_with(tmp_path / "layout", [os.urandom(PART_SIZE + 500_000), os.urandom(100_000)])
    listen = f"127.0.0.1:{free_port()}"
    with bucket.mirror(upstream[0], listen=listen) as mirror:
        target = f"docker://{listen}/team/app:1.0"
        skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:1.0", target)

        pulled = pull(mirror.url, "team/app", "1.0")  # the puller checks every digest
        assert pulled["manifest"] == digest
        stored = bucket.blobs()
        assert stored == {digest: stored[digest], **pulled["blobs"]}, "every blob and the manifest, as objects"
        assert max(pulled["blobs"].values()) > PART_SIZE
        assert blob_files(bucket.data_dir) == {}, "nothing published on local disk"
        assert list((bucket.data_dir / "uploads").iterdir()) == [], "the upload sessions are gone"
        assert list((bucket.data_dir / "tmp").iterdir()) == []
        assert bucket.multipart_uploads() == []

        back = tmp_path / "back"
        skopeo("copy", "--preserve-digests", "--src-tls-verify=false", target, f"dir:{back}")
        for blob in pulled["blobs"]:
            saved = (back / blob.split(":", 1)[1]).read_bytes()
            assert saved == (tmp_path / "layout" / "blobs" / "sha256" / blob.split(":", 1)[1]).read_bytes()


def test_a_chunked_push_resumes_after_a_restart_and_an_abandoned_one_leaves_nothing(
    upstream: tuple[str, list[dict[str, Any]]], seaweed: Seaweed, tmp_path: Path
) -> None:
    """Chunks live in the session's file on local disk, never in the bucket: a restart keeps a session (its PUT
    publishes the object), start-up removes an abandoned one, and no object or multipart upload is left of it."""
    bucket = Bucketed(seaweed, tmp_path)
    kept, abandoned = os.urandom(PART_SIZE + 4000), os.urandom(PART_SIZE + 3000)
    with bucket.mirror(upstream[0]) as mirror:
        resumed = start_upload(mirror.url, "team/chunked")
        patch(mirror.url, resumed, kept[:PART_SIZE])
        left = start_upload(mirror.url, "team/chunked")
        patch(mirror.url, left, abandoned)
    assert bucket.blobs() == {} and bucket.multipart_uploads() == []
    sessions = bucket.data_dir / "uploads"
    assert sorted(len((s / "data").read_bytes()) for s in sessions.iterdir()) == [PART_SIZE, len(abandoned)]

    old = sessions / left.rsplit("/", 1)[1] / "session.json"
    os.utime(old, (old.stat().st_atime - 7200, old.stat().st_mtime - 7200))  # idle for two hours
    with bucket.mirror(upstream[0], "--upload-max-age", "3600") as mirror:
        assert [s.name for s in sessions.iterdir()] == [resumed.rsplit("/", 1)[1]], "start-up removed the idle one"
        status, _, body = exchange(
            mirror.url, "PATCH", left, b"x", {"Content-Range": f"{len(abandoned)}-{len(abandoned)}"}
        )
        assert (status, error_code(body)) == (404, "BLOB_UPLOAD_UNKNOWN")

        patch(mirror.url, resumed, kept[PART_SIZE:], start=PART_SIZE)
        status, _, body = exchange(mirror.url, "PUT", f"{resumed}?digest={sha256(kept)}")
        assert status == 201, body
        assert bucket.blobs() == {sha256(kept): len(kept)}
        assert bucket.multipart_uploads() == []
        assert exchange(mirror.url, "GET", f"/v2/team/chunked/blobs/{sha256(kept)}")[2] == kept


@pytest.mark.parametrize("chunked", [True, False], ids=["POST, PATCH, PUT", "monolithic POST"])
def test_a_wrong_digest_leaves_no_object(
    upstream: tuple[str, list[dict[str, Any]]], seaweed: Seaweed, tmp_path: Path, chunked: bool
) -> None:
    bucket = Bucketed(seaweed, tmp_path)
    data, claimed = os.urandom(PART_SIZE + 1000), sha256(b"something else")
    with bucket.mirror(upstream[0]) as mirror:
        if chunked:
            location = start_upload(mirror.url, "team/wrong")
            patch(mirror.url, location, data)
            status, _, body = exchange(mirror.url, "PUT", f"{location}?digest={claimed}")
        else:
            status, _, body = exchange(mirror.url, "POST", f"/v2/team/wrong/blobs/uploads/?digest={claimed}", data)
        assert (status, error_code(body)) == (400, "DIGEST_INVALID")
        assert bucket.objects() == {} and bucket.multipart_uploads() == []
        assert list((bucket.data_dir / "uploads").iterdir()) == [] and list((bucket.data_dir / "tmp").iterdir()) == []
        for digest in (claimed, sha256(data)):
            assert exchange(mirror.url, "HEAD", f"/v2/team/wrong/blobs/{digest}")[0] == 404


def test_a_mount_links_the_object_already_in_the_bucket(
    upstream: tuple[str, list[dict[str, Any]]], seaweed: Seaweed, tmp_path: Path
) -> None:
    bucket = Bucketed(seaweed, tmp_path)
    data = os.urandom(300_000)
    with bucket.mirror(upstream[0]) as mirror:
        digest = push_blob(mirror.url, "team/source", data)
        status, headers, body = exchange(
            mirror.url, "POST", f"/v2/team/dest/blobs/uploads/?mount={digest}&from=team/source"
        )
        assert status == 201, body
        assert headers["Location"].endswith(f"/v2/team/dest/blobs/{digest}")
        assert exchange(mirror.url, "GET", f"/v2/team/dest/blobs/{digest}")[2] == data
        assert bucket.blobs() == {digest: len(data)}, "one object, linked into both repositories"


def test_a_deleted_manifest_then_gc_removes_its_unreferenced_objects(
    upstream: tuple[str, list[dict[str, Any]]], seaweed: Seaweed, tmp_path: Path
) -> None:
    """The manifest deleted by digest, then the blobs only it used: gc (the CLI beside the server) removes from the
    bucket what no local repository holds and no manifest references any more; a layer the other image shares
    stays, and that image still pulls."""
    bucket = Bucketed(seaweed, tmp_path, "[cache]\ngc_grace = 0\n")
    shared = os.urandom(200_000)
    with bucket.mirror(upstream[0]) as mirror:
        gone = push_random_image(mirror.url, "team/gone", "1", [shared, os.urandom(150_000)])
        kept = push_random_image(mirror.url, "team/kept", "1", [shared])
        status, _, body = exchange(mirror.url, "DELETE", f"/v2/team/gone/manifests/{gone['manifest']}")
        assert status == 202, body
        for blob in (gone["config"], gone["layers"][1]):
            assert exchange(mirror.url, "DELETE", f"/v2/team/gone/blobs/{blob}")[0] == 202
        assert set(bucket.blobs()) >= {gone["manifest"], gone["config"], gone["layers"][1]}, "until gc"
        bucket.cli("gc")

        stored = bucket.blobs()
        assert {gone["manifest"], gone["config"], gone["layers"][1]}.isdisjoint(stored)
        assert {kept["manifest"], kept["config"], sha256(shared)} <= set(stored)
        assert pull(mirror.url, "team/kept", "1")["blobs"][sha256(shared)] == len(shared)
        status, _, _ = exchange(mirror.url, "GET", f"/v2/team/gone/manifests/{gone['manifest']}")
        assert status == 404


def test_verify_quarantines_a_corrupted_pushed_object(
    upstream: tuple[str, list[dict[str, Any]]], seaweed: Seaweed, tmp_path: Path
) -> None:
    """A pushed object overwritten behind the mirror's back is found by ``mirror verify``, moved to quarantine/, and
    never served with the wrong bytes; pushing the blob again restores it."""
    bucket = Bucketed(seaweed, tmp_path)
    layer = os.urandom(250_000)
    with bucket.mirror(upstream[0]) as mirror:
        image = push_random_image(mirror.url, "team/damaged", "1", [layer])
        victim = image["layers"][0]
        raw_client(seaweed.endpoint_url).put_object(
            Bucket=seaweed.bucket, Key=bucket.key(victim), Body=bytes([layer[0] ^ 0xFF]) + layer[1:]
        )

        code, out = bucket.cli("verify", check=False)
        assert code == 1 and f"quarantined {victim}" in out
        keys = bucket.objects()
        assert bucket.key(victim) not in keys
        assert any(k.startswith(f"{bucket.prefix}quarantine/{victim.replace(':', '-')}.") for k in keys)
        status, _, _ = exchange(mirror.url, "GET", f"/v2/team/damaged/blobs/{victim}")
        assert status == 404, "gone, not served damaged"

        assert push_blob(mirror.url, "team/damaged", layer) == victim
        assert exchange(mirror.url, "GET", f"/v2/team/damaged/blobs/{victim}")[2] == layer
        assert "0 did not match" in bucket.cli("verify")[1]


def test_eviction_removes_least_recently_served_pulled_objects_and_never_a_pushed_one(
    upstream: tuple[str, list[dict[str, Any]]], seaweed: Seaweed, tmp_path: Path
) -> None:
    url, images = upstream
    bucket = Bucketed(seaweed, tmp_path)
    served: dict[str, int] = {}  # digest -> the request that last received it
    clock = itertools.count()
    with bucket.mirror(url, "--cache-size", "2MiB") as mirror:
        pushed = push_random_image(mirror.url, "team/pushed", "1", [os.urandom(3 * LAYER)])
        for i in (0, 1, 2, 0, 3, 4, 5, 6, 7):  # app0 served again: more recent than app1 and app2
            received = pull(mirror.url, f"app{i}", "latest")
            for digest in (received["manifest"], *received["blobs"]):
                served[digest] = next(clock)
            # A client has its last byte at the digest check; the object and its record come just after.
            wait_until(lambda: mirror_idle(mirror), what="the pull's fetches recorded")
            wait_until(lambda: settled(mirror), what="eviction to the low watermark")
        stored = bucket.blobs()

    assert {pushed["manifest"], pushed["config"], *pushed["layers"]} <= set(stored), "pushed content stays"
    evicted, kept = set(served) - set(stored), set(served) & set(stored)
    assert images[1]["layers"][0] in evicted, "the pulls went past the cap"
    assert max(served[d] for d in evicted) < min(served[d] for d in kept), "least recently served go first"
    assert sum(stored.values()) <= LIMIT


def mirror_idle(mirror: Mirror) -> bool:
    """No blob fetch under way (each one recorded in the usage table)."""
    found = re.search(r"^mirror_inflight_fetches (\S+)$", mirror.metrics(), re.M)
    return found is None or float(found.group(1)) == 0


def settled(mirror: Mirror) -> bool:
    text = mirror.metrics()
    used = sum(
        float(m.group(1))
        for name in ("mirror_cache_size_bytes", "mirror_cache_pending_bytes")
        if (m := re.search(rf"^{name} (\S+)$", text, re.M))
    )
    return used <= 0.95 * LIMIT
