"""The workers rows (``--only workers``): the mirror under test (started with the ``--mirror-flag`` flags, e.g.
``--mirror-flag=--workers=2``) against a one-process mirror (the same flags without ``--workers``) in the same
run: small requests at 32 connections and a 32-client cold herd on loopback. The peak memory of all the worker
processes together is the ``memory`` workload's row (it sums the process tree).

Without a ``--workers`` flag both mirrors are one process, and the ratios are about 1."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tests.bench.load import MANIFEST_ACCEPT, download, wrk
from tests.bench.report import Row, human_size, median
from tests.bench.world import push_random_blob, push_small_image, say
from tests.support.ops import Mirror

if TYPE_CHECKING:
    from tests.bench.run import Bench


def worker_count(flags: list[str]) -> int:
    """The worker processes ``mirror serve`` runs with ``flags`` (``--workers N``, ``--workers=N``, ``auto``)."""
    value = "1"
    for i, flag in enumerate(flags):
        if flag == "--workers" and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith("--workers="):
            value = flag.partition("=")[2]
    return (os.cpu_count() or 1) if value == "auto" else int(value)


def without_workers(flags: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for flag in flags:
        if skip:
            skip = False
        elif flag == "--workers":
            skip = True
        elif not flag.startswith("--workers="):
            kept.append(flag)
    return kept


def workers(bench: Bench) -> None:
    world = bench.world
    one = Mirror(world.root / "mirror-one-data", world.upstream_url, "--log-level", "warning",
                 *without_workers(world.mirror_flags), log=world.root / "mirror-one.log")  # fmt: skip
    say(f"one-process mirror {one.url} beside the mirror under test ({bench.workers} worker(s))")
    try:
        _small(bench, one)
        _herd(bench, one)
    finally:
        one.stop()


def _small(bench: Bench, one: Mirror) -> None:
    digest, layer = push_small_image(bench.world.upstream_url, "bench/workers", bench.scratch)
    mirrors = {"mirror": bench.world.mirror.url, "one": one.url}
    cases = [
        ("manifest GET by digest", f"/v2/bench/workers/manifests/{digest}"),
        ("1 KiB blob GET", f"/v2/bench/workers/blobs/{layer}"),
    ]
    for base in mirrors.values():  # warm both caches
        for _, path in cases:
            wrk(base + path, 1, connections=1, accept=MANIFEST_ACCEPT)
    for title, path in cases:
        samples: dict[str, list[float]] = {name: [] for name in mirrors}
        for rep in range(bench.sizes.reps):
            for name, base in mirrors.items():
                rate = wrk(base + path, bench.sizes.wrk_seconds, accept=MANIFEST_ACCEPT)
                if rate.errors:
                    raise RuntimeError(f"{title} on the mirror ({name}): {rate.errors} errors")
                samples[name].append(rate.requests_per_s)
            say(f"{title} round {rep + 1}: {bench.workers} worker(s) {samples['mirror'][-1]:,.0f}, "
                f"1 worker {samples['one'][-1]:,.0f}")  # fmt: skip
        m, r = median(samples["mirror"]), median(samples["one"])
        bench.add(Row(f"{title}, 32 connections, --workers {bench.workers} vs 1", "req/s", m, reference=r,
                      reference_name="1 worker", target=">= 1.7x one worker", met=m >= 1.7 * r,
                      samples=samples))  # fmt: skip


def _herd(bench: Bench, one: Mirror) -> None:
    size, clients = bench.sizes.herd, 32
    bases = {"mirror": bench.world.mirror.url, "proxy": bench.world.proxy_url, "one": one.url}
    walls: dict[str, list[float]] = {name: [] for name in bases}
    gets: list[float] = []
    for rep in range(bench.sizes.reps):
        repo = f"bench/workers-herd{rep}"
        digest = push_random_blob(bench.world.upstream_url, repo, size, bench.scratch)
        for name, base in bases.items():
            os.sync()  # the setup's writes, not the workload's, as in run.quiet_disk
            before = bench.upstream_gets(digest)
            walls[name].append(download([f"{base}/v2/{repo}/blobs/{digest}"] * clients, size).seconds)
            if name == "mirror":
                gets.append(bench.settled_gets(digest) - before)
        say(f"workers herd x{clients} round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in walls.items())
            + f"; {gets[-1]:g} upstream GETs from the mirror under test")  # fmt: skip
    m, p, r = (median(walls[k]) for k in ("mirror", "proxy", "one"))
    one_get = all(g == 1 for g in gets)
    bench.add(Row(f"{clients} concurrent cold GETs of a {human_size(size)} blob, --workers {bench.workers}: wall "
                  f"time", "s", m, p, r, "1 worker", "<= 0.4x proxy's wall time, exactly 1 upstream GET",
                  one_get and m <= 0.4 * p, walls))  # fmt: skip
    bench.add(Row(f"{clients} concurrent cold GETs, --workers {bench.workers}: upstream GETs", "GETs", max(gets),
                  target="exactly 1", met=one_get, samples={"mirror": gets}))  # fmt: skip
