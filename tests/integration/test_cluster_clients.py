"""The real clients through a real HAProxy in front of three ``mirror serve`` replicas (each with its own data dir,
sharing one real SeaweedFS bucket prefix and one real Redis), in front of a real Distribution: skopeo, containerd,
dockerd and podman pull through the load balancer and get the images pushed; a second pull is served from the
bucket whichever replica answers; the lease-holding replica killed mid-blob costs containerd and dockerd a pause
(they resume with Range on another replica, which took the fetch over), not an error."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from tests.support.clients import Containerd, Docker, Podman, podman, skopeo, start_containerd, start_dockerd
from tests.support.cluster import replica_config
from tests.support.haproxy import HAProxy, config, haproxy
from tests.support.images import Image, push_tar_image, random_files
from tests.support.ops import (
    Mirror,
    bytes_under,
    free_port,
    nginx_requests,
    record_figures,
    throttled_upstream,
    upstream_requests,
    wait_until,
)
from tests.support.plain_http import OCI_CONFIG, OCI_MANIFEST, _request, push_blob, sha256
from tests.support.redis import RedisServer, redis_fixture  # noqa: F401 - redis_fixture: the fixture
from tests.support.seaweed import Seaweed, raw_client, seaweed_fixture  # noqa: F401 - seaweed_fixture: the fixture

pytestmark = pytest.mark.integration

MiB = 1 << 20
BIG = 256 * MiB  # the layer a replica dies in the middle of
SLOW = "32m"  # the upstream's rate per download through nginx: the big layer takes about 8 s
SECRET = "cluster-secret-" + "h" * 24
OCI_TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"  # uncompressed: no gzip of 256 MiB in the test


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with throttled_upstream(tmp_path_factory.mktemp("upstream"), slow=SLOW) as upstream:
        yield upstream


@dataclass
class Cluster:
    replicas: list[Mirror]
    lb: HAProxy
    prefix: str
    redis_url: str

    def replica_at(self, url: str) -> Mirror:
        return next(mirror for mirror in self.replicas if mirror.url == url)

    def name(self, replica: Mirror) -> str:
        """Its server name in HAProxy's configuration (and log)."""
        return f"replica-{self.replicas.index(replica)}"


def cluster(stack: ExitStack, work: Path, upstream: str, seaweed: Seaweed, redis_url: str, prefix: str) -> Cluster:
    """Three replicas (own data dirs, one bucket prefix, one Redis) and HAProxy in front of them."""
    replicas = []
    for n in range(3):
        listen = f"127.0.0.1:{free_port()}"
        config = replica_config(work / f"replica-{n}.toml", seaweed, redis_url, prefix, f"http://{listen}", SECRET)
        replicas.append(stack.enter_context(Mirror(work / f"data-{n}", upstream, "--config", str(config),
                                                   "--read-only", listen=listen)))  # fmt: skip
    lb = stack.enter_context(haproxy(work / "haproxy", {f"replica-{n}": m.url for n, m in enumerate(replicas)}))
    return Cluster(replicas, lb, prefix, redis_url)


@pytest.fixture(scope="module")
def pulls(
    upstream: dict[str, Any], seaweed: Seaweed, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The cluster the pull tests share, in front of Distribution itself (no throttle)."""
    with ExitStack() as stack:
        yield cluster(stack, tmp_path_factory.mktemp("pulls"), upstream["url"], seaweed, redis_server.url, "pulls/")


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    daemon = start_containerd(tmp_path_factory.mktemp("containerd"))
    try:
        yield daemon
    finally:
        daemon.stop()


# --- every client pulls through the load balancer, cold then warm -------------------------------------------------
def pull_skopeo(lb: HAProxy, ref: str, work: Path) -> str:
    """The manifest digest skopeo copied (``dir:``, every byte kept)."""
    target = work / f"skopeo-{len(list(work.glob('skopeo-*')))}"
    skopeo("copy", "--preserve-digests", "--src-tls-verify=false", f"docker://{lb.host}/{ref}", f"dir:{target}")
    return sha256((target / "manifest.json").read_bytes())


def pull_containerd(daemon: Containerd, lb: HAProxy, ref: str, namespace: str) -> str:
    daemon.namespace = namespace  # a namespace has its own content (isolated): a fresh one downloads everything
    daemon.pull(daemon.mirror_hosts_dir("ha", lb.url), f"docker.io/{ref}")
    listed = daemon.ctr("images", "ls", f"name==docker.io/{ref}")
    return next(word for word in listed.split() if word.startswith("sha256:"))


def pull_docker(daemon: Docker, ref: str, again: bool) -> str:
    name = ref.removeprefix("library/")  # what users type: docker pull app:1.0
    if again:
        daemon("rmi", name)
    daemon("pull", name)
    digests = json.loads(daemon("image", "inspect", "--format", "{{json .RepoDigests}}", name))
    return str(digests[0].partition("@")[2])


def pull_podman(client: Podman, ref: str, again: bool) -> str:
    if again:
        client("rmi", f"docker.io/{ref}")
    client("pull", f"docker.io/{ref}")
    digests = json.loads(client("image", "inspect", "--format", "{{json .RepoDigests}}", f"docker.io/{ref}"))
    return str(digests[0].partition("@")[2])


def puller(client: str, lb: HAProxy, work: Path, request: pytest.FixtureRequest) -> Callable[[str, bool], str]:
    """``pull(ref, again)`` for ``client`` through ``lb``: the digest the client recorded for the image."""
    if client == "skopeo":
        return lambda ref, again: pull_skopeo(lb, ref, work)
    if client == "containerd":
        daemon: Containerd = request.getfixturevalue("containerd")
        return lambda ref, again: pull_containerd(daemon, lb, ref, "warm" if again else "cold")
    if client == "dockerd":
        factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
        docker = start_dockerd(factory.mktemp("dockerd"), mirror=lb.url)  # a short path: its sockets live there
        request.addfinalizer(docker.stop)
        return lambda ref, again: pull_docker(docker, ref, again)
    user = podman(work / "podman")
    request.addfinalizer(user.close)
    user.use_mirror(lb.host)
    return lambda ref, again: pull_podman(user, ref, again)


@pytest.mark.parametrize(
    "client",
    ["skopeo", "containerd", "dockerd", "podman"],
    ids=[f"{c} pulls a 3-layer image through HAProxy; the second pull makes no upstream blob GET" for c in
         ("skopeo", "containerd", "dockerd", "podman")],
)  # fmt: skip
def test_a_client_pulls_through_haproxy_and_pulls_again_from_the_bucket(
    client: str, pulls: Cluster, upstream: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    layers = [{"etc/release": f"{client} 1.0\n".encode()}, random_files("opt/a.bin", 700 << 10),
              random_files("opt/b.bin", 300 << 10)]  # fmt: skip
    image = push_tar_image(upstream["url"], f"library/ha-{client}", "1.0", layers, docker=True)
    pull = puller(client, pulls.lb, tmp_path, request)
    log = upstream["log"]

    assert pull(image.repo + ":1.0", False) == image.manifest
    cold = {blob: upstream_requests(log, "GET", f"/blobs/{blob}") for blob in image.blobs}
    assert cold == dict.fromkeys(image.blobs, 1), "one upstream GET per blob for the whole cluster"
    seen = len(pulls.lb.requests(f"/v2/{image.repo}/blobs/"))

    assert pull(image.repo + ":1.0", True) == image.manifest
    assert {blob: upstream_requests(log, "GET", f"/blobs/{blob}") for blob in image.blobs} == cold, "no blob GET"
    warm = [r for r in pulls.lb.requests(f"/v2/{image.repo}/blobs/")[seen:] if r.method == "GET"]
    assert {r.uri.partition("?")[0].rpartition("/")[2] for r in warm} == set(image.blobs), "every blob again"
    assert all(r.status == 200 for r in warm), warm
    servers = {r.server for r in warm}
    assert len(servers) >= 2, f"the warm blob GETs went to several replicas (round robin): {servers}"
    assert all(r.server == "<NOSRV>" for r in pulls.lb.requests("/_mirror/")), "no client reached /_mirror/"


KIT_DIRECTIVES = ("balance", "option httpchk", "http-check", "http-request deny", "retries", "option redispatch",
                  "timeout")  # fmt: skip


def directives(text: str) -> set[str]:
    """The kit's routing, health and timeout lines of an HAProxy configuration, whitespace normalised."""
    lines = {" ".join(line.split("#")[0].split()) for line in text.splitlines()}
    return {line for line in lines if line.startswith(KIT_DIRECTIVES)}


def test_the_tests_haproxy_routes_as_the_deploy_kits_does() -> None:
    """The HAProxy in front of these replicas balances, checks, denies and times out as deploy/cluster's does."""
    kit = (Path(__file__).resolve().parents[2] / "deploy" / "cluster" / "haproxy.cfg").read_text()
    ours = directives(config(free_port(), {"replica-0": "http://127.0.0.1:1"}))
    assert ours == directives(kit)
    assert "balance roundrobin" in ours and "option httpchk GET /readyz" in ours


def test_haproxy_denies_the_internal_endpoints_to_clients(pulls: Cluster) -> None:
    path = f"/_mirror/v1/fetches/docker.io/sha256:{'0' * 64}?fetch=none"
    try:
        _request("GET", pulls.lb.url + path, headers={"X-Mirror-Cluster-Secret": SECRET})
        raise AssertionError("HAProxy passed an internal endpoint on")
    except OSError as exc:
        assert getattr(exc, "code", None) == 404
    wait_until(lambda: bool(pulls.lb.requests("/_mirror/")), within=10, what="HAProxy logging the request")
    (denied,) = pulls.lb.requests("/_mirror/")
    assert (denied.server, denied.status) == ("<NOSRV>", 404)


# --- the lease holder killed mid-blob while containerd and dockerd pull through HAProxy -------------------------
def push_big_image(registry: str, repo: str, tag: str) -> Image:
    """An OCI image of one uncompressed tar layer holding a ``BIG``-byte file of random bytes and a small one."""
    marker = f"{repo} {time.time_ns()}\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, size, source in (("etc/ha", len(marker), io.BytesIO(marker)), ("big.bin", BIG, None)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o644
            tar.addfile(info, source or io.BytesIO(os.urandom(size)))
    layer = buf.getvalue()
    del buf
    layer_digest = push_blob(registry, repo, layer)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()  # fmt: skip
    config_digest = push_blob(registry, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_TAR_LAYER, "digest": layer_digest, "size": len(layer)}],
    }).encode()  # fmt: skip
    with _request("PUT", f"{registry}/v2/{repo}/manifests/{tag}", manifest, {"Content-Type": OCI_MANIFEST}):
        pass
    sizes = {layer_digest: len(layer), config_digest: len(config)}
    return Image(repo, sha256(manifest), len(manifest), OCI_MANIFEST, config_digest, [layer_digest],
                 {"etc/ha": marker}, sizes=sizes)  # fmt: skip


def lease_holder(redis_url: str, digest: str) -> str | None:
    """The advertise URL of the replica holding ``digest``'s fetch lease, if one does."""
    with redis_py.Redis.from_url(redis_url) as client:
        value = client.get(f"mirror:lease:docker.io:{digest}")
    return None if value is None else value.decode().partition(" ")[2]


def stored_digest(seaweed: Seaweed, key: str) -> tuple[int, str]:
    """Size and digest of an object in the bucket, hashed as it streams (bounded memory)."""
    body = raw_client(seaweed.endpoint_url).get_object(Bucket=seaweed.bucket, Key=key)["Body"]
    hasher, size = hashlib.sha256(), 0
    for chunk in body.iter_chunks(1 << 20):
        hasher.update(chunk)
        size += len(chunk)
    return size, "sha256:" + hasher.hexdigest()


def read_blob(url: str, received: list[int], n: int) -> str:
    """A plain client reading a blob to the end, hashing as it goes; ``received[n]`` counts its bytes."""
    hasher = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=300) as resp:
        while chunk := resp.read(1 << 20):
            hasher.update(chunk)
            received[n] += len(chunk)
    return "sha256:" + hasher.hexdigest()


def unfinished_uploads(seaweed: Seaweed, prefix: str) -> list[tuple[str, int]]:
    """(key, bytes in its parts) of each multipart upload under ``prefix`` never completed nor aborted."""
    client = raw_client(seaweed.endpoint_url)
    found = []
    for upload in client.list_multipart_uploads(Bucket=seaweed.bucket, Prefix=prefix).get("Uploads", []):
        parts = client.list_parts(Bucket=seaweed.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        found.append((upload["Key"], sum(part["Size"] for part in parts.get("Parts", []))))
    return found


def test_kill_9_of_the_lease_holder_mid_blob_costs_containerd_and_dockerd_a_pause_not_an_error(
    upstream: dict[str, Any],
    seaweed: Seaweed,
    redis_server: RedisServer,
    containerd: Containerd,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """containerd and dockerd pull an image with a 256 MiB layer through HAProxy from a slow upstream, and a plain
    client reads the layer from each other replica; the replica holding the layer's lease (the one containerd's
    download reached first) is killed with SIGKILL while all of them are downloading it. containerd's download is
    cut and resumed with Range on a survivor (dockerd's too when round robin sent it to the same replica); a
    survivor takes the upstream fetch over with a Range request for the rest from what it had streamed; every
    client ends with the right bytes, and the bucket holds the layer once, whole and verified."""
    image = push_big_image(upstream["url"], "library/ha-big", "1.0")
    layer = image.layers[0]
    size = image.sizes[layer]
    redis_url = redis_server.url.removesuffix("/0") + "/1"  # a database of its own: no state shared with `pulls`
    received = [0, 0]
    with ExitStack() as stack:
        ha = cluster(stack, tmp_path, upstream["slow"], seaweed, redis_url, "kill/")
        docker = start_dockerd(tmp_path_factory.mktemp("dockerd"), mirror=ha.lb.url)  # sockets: a short path
        stack.callback(docker.stop)
        containerd.namespace = "kill"
        hosts_dir = containerd.mirror_hosts_dir("kill", ha.lb.url)

        def downloading(agent: str) -> list[str]:
            """The replicas that began answering ``agent``'s GETs of the layer."""
            gets = ha.lb.requests(f"/blobs/{layer}")
            return [r.server for r in gets if r.status == 200 and r.agent.startswith(agent + "/")]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            by_ctr = pool.submit(containerd.pull, hosts_dir, "docker.io/library/ha-big:1.0")
            wait_until(lambda: bool(downloading("containerd")) or by_ctr.done(), within=120,
                       what="containerd downloading the big layer")  # fmt: skip
            holder_url = lease_holder(redis_url, layer)
            assert holder_url is not None, "a replica holds the layer's lease"
            holder = ha.replica_at(holder_url)
            assert downloading("containerd") == [ha.name(holder)], "containerd's GET made the replica take the lease"
            survivors = [m for m in ha.replicas if m is not holder]
            readers = [pool.submit(read_blob, f"{m.url}/v2/library/ha-big/blobs/{layer}", received, n)
                       for n, m in enumerate(survivors)]  # fmt: skip
            by_docker = pool.submit(docker, "pull", "ha-big:1.0")
            wait_until(lambda: (bool(downloading("docker")) and all(received)) or by_docker.done(), within=120,
                       what="dockerd and the plain readers downloading the big layer")  # fmt: skip
            tmp = holder.data_dir / "tmp"
            wait_until(lambda: bytes_under(tmp) >= 32 * MiB, within=60, what="the holder 32 MiB into the layer")
            assert not any(f.done() for f in (by_ctr, by_docker, *readers)), "all still downloading at the kill"
            holder.kill9()
            killed_at = time.monotonic()
            at_kill = min(received)
            by_ctr.result(timeout=300)
            by_docker.result(timeout=300)
            assert [reader.result(timeout=300) for reader in readers] == [layer, layer], "verified bytes"
            after_kill = round(time.monotonic() - killed_at, 3)

        # Both clients have the image (each verified the layer's digest before committing it) and unpacked it.
        assert image.manifest in containerd.ctr("images", "ls", "name==docker.io/library/ha-big:1.0")
        assert containerd.read_file("docker.io/library/ha-big:1.0", "etc/ha") == image.files["etc/ha"]
        assert image.manifest in docker("image", "inspect", "--format", "{{json .RepoDigests}}", "ha-big:1.0")
        assert docker.read_file("ha-big:1.0", "/etc/ha") == image.files["etc/ha"]

        # The cut clients asked a survivor for the rest with Range, and got a 206.
        gets = ha.lb.requests(f"/blobs/{layer}")
        resumed = [r for r in gets if r.range]
        cut = {"containerd"} | ({"docker"} if downloading("docker")[0] == ha.name(holder) else set())
        assert {r.agent.partition("/")[0] for r in resumed} == cut, gets
        assert all(r.status == 206 and r.server != ha.name(holder) for r in resumed), gets
        # The upstream: the first GET, then one Range request for the rest (the takeover), from what the survivor
        # that took it over had streamed from the holder.
        requests = nginx_requests(upstream["slow_dir"], f"/blobs/{layer}", at_least=2)
        ranged = [(status, rng) for _, status, rng in requests if rng != "-"]
        assert len(requests) == 2 and len(ranged) == 1, requests
        status, rng = ranged[0]
        start = int(rng.removeprefix("bytes=").removesuffix("-"))
        assert status == 206 and at_kill <= start < size, ranged
        # The bucket: the layer once, of the right size and digest.
        key = f"kill/blobs/{layer.replace(':', '/')}"
        listed = raw_client(seaweed.endpoint_url).list_objects_v2(Bucket=seaweed.bucket, Prefix="kill/")
        objects = {item["Key"]: item["Size"] for item in listed.get("Contents", [])}
        assert {k: v for k, v in objects.items() if layer.partition(":")[2] in k} == {key: size}
        assert stored_digest(seaweed, key) == (size, layer)
        # The dead holder's multipart upload (never completed, so never visible) was aborted by the replica that
        # took the fetch over: no parts left behind.
        left = unfinished_uploads(seaweed, "kill/")
        assert left == [], left
        record_figures(
            "cluster kill -9 through haproxy",
            layer_bytes=size,
            range_start=start,
            seconds_after_kill=after_kill,
            cut_clients=sorted(cut),
            multipart_uploads_left=left,
        )
