"""``python -m tests.bench.ui``: how long each page of the web page takes with 10,000 cached entries.

It fills a data dir through the mirror's own storage classes (``BlobStore``, ``Index``, ``Usage``) with
``--repos`` pulled-through repositories of one tagged image each (a manifest, a config and 8 layers: 10 entries)
plus one repository with ``--tags`` tags over a fifth as many images (10,000 entries with the defaults), starts ``mirror serve`` on it (admin API on), and requests every page
``--rounds`` times over loopback, printing the median and the slowest time of each (the whole response, as a
browser on the same host waits for it). Not part of the test suite: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mirror.oci.reference import Digest, Repo
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index, ManifestRecord, TagRecord
from mirror.storage.usage import Usage
from tests.support.ops import NO_UPSTREAM, Mirror

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYERS = 8
TAGS_PER_IMAGE = 5
BUDGET = 0.100  # seconds: "pages render in under 100 ms with 10,000 cached entries"


async def _image(store: BlobStore, index: Index, usage: Usage, repo: Repo, seed: int) -> tuple[Digest, int]:
    """One image of random small blobs, recorded as a pull through ``repo`` would record it."""
    name = str(repo)
    descs = []
    for part in range(LAYERS + 1):
        data = os.urandom(64) + f"{seed}-{part}".encode()
        digest = await store.put(data)
        await usage.added(digest, len(data), "blob", name)
        await index.add_origin(digest, repo.registry)
        descs.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": str(digest), "size": len(data)}
        )
    config, *layers = descs
    config["mediaType"] = "application/vnd.oci.image.config.v1+json"
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}).encode()
    digest = await store.put(body)
    await index.put_manifest(digest, ManifestRecord(OCI_MANIFEST, len(body)))
    await usage.added(digest, len(body), "manifest", name)
    await index.add_origin(digest, repo.registry)
    return digest, len(body)


async def fill(data_dir: Path, repos: int, tags: int) -> dict[str, str]:
    """The data dir; returns a few names the pages are asked for."""
    store, index, usage = BlobStore(data_dir), Index(data_dir), Usage(data_dir)
    try:

        async def one(number: int) -> str:
            repo = Repo("docker.io", f"library/app-{number:05d}")
            digest, size = await _image(store, index, usage, repo, number)
            await index.mark_pulled(repo)
            await index.put_tag(repo, "1.0", TagRecord(digest, OCI_MANIFEST, size, time.time()))
            return str(digest)

        first = ""
        for start in range(0, repos, 16):  # fsyncs overlap: 16 images at once
            done = await asyncio.gather(*(one(n) for n in range(start, min(repos, start + 16))))
            first = first or done[0]
        many = Repo("docker.io", "library/many")
        for number in range(0, tags, TAGS_PER_IMAGE):  # as releases go: 1.2.3, 1.2, 1, latest, ... on one image
            digest, size = await _image(store, index, usage, many, -1 - number)
            for tag in range(number, min(tags, number + TAGS_PER_IMAGE)):
                await index.put_tag(many, f"v{tag:04d}", TagRecord(digest, OCI_MANIFEST, size, time.time()))
        return {"digest": first, "middle": f"docker.io/library/app-{repos // 2:05d}"}
    finally:
        index.close()
        usage.close()


def pages(names: dict[str, str]) -> dict[str, str]:
    middle = names["middle"]
    return {
        "overview": "/ui/",
        "in flight (JSON)": "/ui/inflight.json",
        "repositories, first page": "/ui/repositories",
        "repositories, a middle page": "/ui/repositories?" + urllib.parse.urlencode({"after": middle}),
        "repositories, a search": "/ui/repositories?q=app-009",
        "repositories, a search matching nothing": "/ui/repositories?q=nothing-like-this",
        "one repository": "/ui/repositories/docker.io/library/app-00001",
        "a repository with many tags": "/ui/repositories/docker.io/library/many",
        "one image": "/ui/images/docker.io/library/app-00000?" + urllib.parse.urlencode({"digest": names["digest"]}),
        "upstreams": "/ui/upstreams",
        "actions": "/ui/actions/",
        "confirm evict (a dry run)": "/ui/actions/evict",
    }


def timed(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()
        assert resp.status == 200, (url, resp.status)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=int, default=900, help="repositories of 10 entries each (default 900)")
    parser.add_argument("--tags", type=int, default=500, help="tags of the one repository with many")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-bench-ui-") as workdir:
        data = Path(workdir) / "data"
        started = time.monotonic()
        names = asyncio.run(fill(data, args.repos, args.tags))
        entries = (args.repos + -(-args.tags // TAGS_PER_IMAGE)) * (LAYERS + 2)
        print(f"filled {data} with {entries} entries in {time.monotonic() - started:.1f} s")
        slow = []
        with Mirror(data, NO_UPSTREAM, "--admin-api") as mirror:
            print(f"{'page':42} {'median':>9} {'slowest':>9}")
            for name, path in pages(names).items():
                timed(mirror.url + path)  # the first render compiles the template
                times = [timed(mirror.url + path) for _ in range(args.rounds)]
                median = statistics.median(times)
                print(f"{name:42} {median * 1000:7.1f} ms {max(times) * 1000:7.1f} ms")
                if median > BUDGET:
                    slow.append(name)
        print("every page under 100 ms (median)" if not slow else f"over 100 ms: {', '.join(slow)}")
        return 1 if slow else 0


if __name__ == "__main__":
    raise SystemExit(main())
