"""The cluster rows (``--only cluster``): three replicas against one, each set behind its own real HAProxy, on one
SeaweedFS bucket (a prefix each) and one Redis (a database each), side by side in one run:

- a herd of 32 clients on one cold blob through the load balancer: wall time, and upstream GETs (exactly 1 for
  either set: the replicas' leases make one fetch for the cluster);
- 8 clients downloading one cached blob at once through the load balancer: MB/s together. This machine's cores
  are shared by every replica, so the target is no loss from coordination (>= 1.0x one replica), not scaling;
  once from the bucket, and once with a local tier on every replica (two more sets, behind HAProxies of their own);
- a cold 1 KiB blob asked of two replicas at the same moment (one takes the lease and fetches, the other follows
  it): the slower answer against a cold 1 KiB GET of the one-node mirror on local disk (the run's mirror under
  test), medians over many blobs; the target is under 5 ms more.
"""

from __future__ import annotations

import http.client
import os
import secrets
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from tests.bench.load import download
from tests.bench.report import MiB, Row, human_size, median
from tests.bench.world import push_random_blob, say
from tests.support.haproxy import haproxy
from tests.support.ops import Mirror, free_port
from tests.support.plain_http import push_blob
from tests.support.redis import redis_server
from tests.support.seaweed import Seaweed, create_bucket, seaweed_server

if TYPE_CHECKING:
    from tests.bench.run import Bench

SECRET = "bench-cluster-secret-" + "x" * 16
HERD_SIZE, QUICK_HERD = 128 * MiB, 16 * MiB
CACHED_SIZE, QUICK_CACHED = 256 * MiB, 32 * MiB
SMALL_BLOBS, QUICK_SMALL = 40, 8


def _config(path: Path, seaweed: Seaweed, redis_url: str, prefix: str, advertise: str, tier: str = "") -> Path:
    path.write_text(
        f'[storage]\nbackend = "s3"\nendpoint_url = "{seaweed.endpoint_url}"\nbucket = "{seaweed.bucket}"\n'
        f'region = "{seaweed.region}"\nprefix = "{prefix}"\naccess_key = "{seaweed.access_key}"\n'
        f'secret_key = "{seaweed.secret_key}"\n'
        + (f'local_cache = "{tier}"\n' if tier else "")
        + f'[cluster]\nredis_url = "{redis_url}"\nadvertise = "{advertise}"\nsecret = "{SECRET}"\n'
    )
    return path


def _replicas(
    stack: ExitStack, root: Path, upstream: str, seaweed: Seaweed, redis_url: str, n: int, tier: str = ""
) -> list[Mirror]:
    """``n`` replicas on a bucket prefix of their own; ``tier``: the size of each one's local tier ("": none)."""
    prefix = f"bench-{secrets.token_hex(4)}/"
    root.mkdir(parents=True, exist_ok=True)
    started = []
    for i in range(n):
        listen = f"127.0.0.1:{free_port()}"
        config = _config(root / f"replica-{i}.toml", seaweed, redis_url, prefix, f"http://{listen}", tier)
        mirror = Mirror(root / f"replica-{i}-data", upstream, "--log-level", "warning", "--config", str(config),
                        listen=listen, log=root / f"replica-{i}.log")  # fmt: skip
        started.append(stack.enter_context(mirror))
    return started


def cluster(bench: Bench) -> None:
    world = bench.world
    quick = bench.sizes.cached <= 64 * MiB
    root = world.root / "cluster"
    with ExitStack() as stack:
        endpoint = stack.enter_context(seaweed_server(root / "seaweed"))
        create_bucket(endpoint, "mirror")
        seaweed = Seaweed(endpoint, "mirror")
        redis = stack.enter_context(redis_server(root / "redis"))
        three = _replicas(stack, root / "three", world.upstream_url, seaweed, redis.url, 3)
        one = _replicas(stack, root / "one", world.upstream_url, seaweed, redis.url.rpartition("/")[0] + "/1", 1)
        lbs = {
            "3 replicas": stack.enter_context(
                haproxy(root / "lb-three", {f"r{i}": m.url for i, m in enumerate(three)})
            ),
            "1 replica": stack.enter_context(haproxy(root / "lb-one", {"r0": one[0].url})),
        }
        say("cluster: SeaweedFS " + endpoint + ", Redis " + redis.url + ", HAProxy " +
            ", ".join(f"{k} {v.url}" for k, v in lbs.items()))  # fmt: skip
        urls = {name: lb.url for name, lb in lbs.items()}
        _herd(bench, urls, QUICK_HERD if quick else HERD_SIZE)
        _cached(bench, urls, QUICK_CACHED if quick else CACHED_SIZE)
        _small(bench, three, world.mirror, QUICK_SMALL if quick else SMALL_BLOBS)
        # The same cached row with a local tier on every replica (``local_cache``): hits by sendfile, as a
        # deployment that keeps its hot blobs near the replicas serves them.
        base = redis.url.rpartition("/")[0]
        tiered = {
            "3 replicas": _replicas(stack, root / "three-tier", world.upstream_url, seaweed, base + "/2", 3, "1GiB"),
            "1 replica": _replicas(stack, root / "one-tier", world.upstream_url, seaweed, base + "/3", 1, "1GiB"),
        }
        tier_urls = {
            name: stack.enter_context(
                haproxy(root / f"lb-{name[0]}-tier", {f"r{i}": m.url for i, m in enumerate(set_)})
            ).url
            for name, set_ in tiered.items()
        }
        _cached(bench, tier_urls, QUICK_CACHED if quick else CACHED_SIZE, tier=True)


def _herd(bench: Bench, urls: dict[str, str], size: int) -> None:
    walls: dict[str, list[float]] = {name: [] for name in urls}
    gets: dict[str, list[float]] = {name: [] for name in urls}
    for rep in range(bench.sizes.reps):
        for name, base in urls.items():
            repo = f"bench/cluster-herd-{rep}-{name[0]}"
            digest = push_random_blob(bench.world.upstream_url, repo, size, bench.scratch)
            before = bench.upstream_gets(digest)
            walls[name].append(download([f"{base}/v2/{repo}/blobs/{digest}"] * 32, size).seconds)
            gets[name].append(bench.settled_gets(digest) - before)
        say(f"cluster herd round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s ({gets[k][-1]:g} GETs)"
                                                           for k, v in walls.items()))  # fmt: skip
    three, one = median(walls["3 replicas"]), median(walls["1 replica"])
    bench.add(Row(f"32 concurrent cold GETs of a {human_size(size)} blob through HAProxy, 3 replicas vs 1: wall time",
                  "s", three, reference=one, reference_name="1 replica", target="(no target: the cores are shared)",
                  samples=walls))  # fmt: skip
    single = all(g == 1 for series in gets.values() for g in series)
    bench.add(Row("32 concurrent cold GETs through HAProxy: upstream GETs, 3 replicas (and 1)", "GETs",
                  max(gets["3 replicas"]), reference=max(gets["1 replica"]), reference_name="1 replica",
                  target="exactly 1 for both", met=single, samples=gets))  # fmt: skip


def _cached(bench: Bench, urls: dict[str, str], size: int, tier: bool = False) -> None:
    repo = "bench/cluster-cached" + ("-tier" if tier else "")
    digest = push_random_blob(bench.world.upstream_url, repo, size, bench.scratch)
    for base in urls.values():
        download([f"{base}/v2/{repo}/blobs/{digest}"], size)  # into the bucket (one per set)
        if tier:  # round robin: a hit on each replica, which copies the object to its tier in the background
            for _ in range(3):
                download([f"{base}/v2/{repo}/blobs/{digest}"], size)
    if tier:
        time.sleep(3)  # the copies read back and checked
    rates: dict[str, list[float]] = {name: [] for name in urls}
    for rep in range(bench.sizes.reps * 2):
        for name, base in urls.items():
            rates[name].append(download([f"{base}/v2/{repo}/blobs/{digest}"] * 8, size).mb_per_s)
        say(
            f"cluster cached x8{' (tier)' if tier else ''} round {rep + 1}: "
            + ", ".join(f"{k} {v[-1]:,.0f} MB/s" for k, v in rates.items())
        )
    three, one = median(rates["3 replicas"]), median(rates["1 replica"])
    where = ", each replica with its local tier" if tier else " (from the bucket)"
    bench.add(Row(f"8 clients on a cached {human_size(size)} blob through HAProxy{where}, 3 replicas vs 1", "MB/s", three,
                  reference=one, reference_name="1 replica", target=">= 1.0x one replica", met=three >= one,
                  samples=rates))  # fmt: skip


def _timed_get(url: str) -> float:
    host, _, path = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=60)
    try:
        began = time.monotonic()
        conn.request("GET", "/" + path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or len(body) != 1024:
            raise RuntimeError(f"GET {url}: {resp.status}, {len(body)} bytes")
        return time.monotonic() - began
    finally:
        conn.close()


def _pair(first: str, second: str) -> float:
    """Both URLs asked at the same moment; the slower answer's seconds."""
    times: list[float] = []
    threads = [threading.Thread(target=lambda url: times.append(_timed_get(url)), args=(u,)) for u in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if len(times) != 2:
        raise RuntimeError("a cold GET of the pair did not finish")
    return max(times)


def _small(bench: Bench, three: list[Mirror], single: Mirror, count: int) -> None:
    ms: dict[str, list[float]] = {"cluster": [], "one node": []}
    for n in range(count):
        repo = f"bench/cluster-small-{n}"
        digest = push_blob(bench.world.upstream_url, repo, os.urandom(1024))
        a, b = (f"{m.url}/v2/{repo}/blobs/{digest}" for m in three[:2])
        ms["cluster"].append(1000 * _pair(a, b))
        other = push_blob(bench.world.upstream_url, repo, os.urandom(1024))
        ms["one node"].append(1000 * _timed_get(f"{single.url}/v2/{repo}/blobs/{other}"))
    cluster_ms, one_ms = median(ms["cluster"]), median(ms["one node"])
    say(f"cold 1 KiB: cluster (slower of a pair) {cluster_ms:.2f} ms, one node {one_ms:.2f} ms")
    bench.add(Row("cold 1 KiB blob, the slower of two replicas asked at once vs one node on disk: median", "ms",
                  cluster_ms, reference=one_ms, reference_name="one node", target="< 5 ms more than one node",
                  met=cluster_ms - one_ms < 5.0, samples=ms))  # fmt: skip
