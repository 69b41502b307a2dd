"""The workloads, run against the mirror and CNCF Distribution's proxy in turn (A B, A B, ...), medians and
ratios, and the report (a markdown table on stdout, JSON and markdown files)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.bench.bucket import bucket
from tests.bench.cluster import cluster
from tests.bench.load import MANIFEST_ACCEPT, PeakRss, ab_head, download, skopeo_pulls, wrk
from tests.bench.report import GiB, MiB, Row, human_size, median, table
from tests.bench.wan import Shape, wan
from tests.bench.workers import worker_count, workers
from tests.bench.world import (
    World,
    dumps,
    machine,
    push_random_blob,
    push_small_image,
    say,
    start_static_nginx,
    start_world,
    versions,
)
from tests.support.images import push_list, push_tar_image, random_files
from tests.support.ops import upstream_requests


@dataclass(frozen=True)
class Sizes:
    cached: int  # the cached blob
    cold: int  # the cold blob
    herd: int  # the blob a herd of clients asks for at once
    memory: int  # the blob 16 clients download while the mirror's memory is watched
    layer: int  # each layer of the realistic image
    wan_layer: int  # each layer of the image pulled over the WAN link
    wan_layers: int
    wan_herd: int  # the blob a herd asks for over the WAN link
    wan_check: float  # seconds of the link's cap: the blob that checks the link's rate
    wrk_seconds: float
    reps: int  # A B rounds of every workload


FULL = Sizes(cached=GiB, cold=GiB, herd=512 * MiB, memory=4 * GiB, layer=4 * MiB, wan_layer=8 * MiB, wan_layers=8,
             wan_herd=32 * MiB, wan_check=2, wrk_seconds=10, reps=3)  # fmt: skip
QUICK = Sizes(cached=64 * MiB, cold=64 * MiB, herd=32 * MiB, memory=64 * MiB, layer=256 * 1024, wan_layer=MiB,
              wan_layers=8, wan_herd=8 * MiB, wan_check=1, wrk_seconds=2, reps=1)  # fmt: skip


class Bench:
    def __init__(self, world: World, sizes: Sizes, scratch: Path, shape: Shape):
        self.world = world
        self.sizes = sizes
        self.scratch = scratch
        self.shape = shape  # the WAN link's
        self.workers = worker_count(world.mirror_flags)
        self.rows: list[Row] = []

    def targets(self) -> dict[str, str]:
        return {"mirror": self.world.mirror.url, "proxy": self.world.proxy_url}

    def add(self, row: Row) -> None:
        self.rows.append(row)
        parts = [] if row.mirror is None else [f"mirror {row.mirror:,.2f}"]
        if row.proxy is not None:
            parts.append(f"proxy {row.proxy:,.2f}")
        if row.reference is not None:
            parts.append(f"{row.reference_name} {row.reference:,.2f}")
        verdict = "" if row.met is None else (" -> target met" if row.met else " -> target NOT met")
        say(f"{row.workload}: {', '.join(parts)} {row.unit} ({row.target}){verdict}")

    def upstream_gets(self, digest: str) -> int:
        return upstream_requests(self.world.upstream.log, "GET", f"/blobs/{digest}")

    # --- 1. cached blob throughput, 1 and 8 clients, nginx as the third column --------------------------------
    def cached(self) -> None:
        size = self.sizes.cached
        digest = push_random_blob(self.world.upstream_url, "bench/cached", size, self.scratch)
        path = f"/v2/bench/cached/blobs/{digest}"
        for base in self.targets().values():
            download([base + path], size)  # fill both caches
        small = self.scratch / "small-1k"
        small.write_bytes(os.urandom(1024))
        stored = self.world.mirror.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
        start_static_nginx(self.world, {"cached": stored, "small": small})
        urls = {**{k: v + path for k, v in self.targets().items()}, "nginx": self.world.nginx_url + "/cached"}
        for clients in (1, 8):
            samples: dict[str, list[float]] = {name: [] for name in urls}
            for rep in range(self.sizes.reps * 2 if clients == 1 else self.sizes.reps):
                for name, url in urls.items():
                    samples[name].append(download([url] * clients, size).mb_per_s)
                say(f"cached x{clients} round {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in samples.items()))
            m, p, n = (median(samples[k]) for k in ("mirror", "proxy", "nginx"))
            self.add(
                Row(f"cached {human_size(size)} blob, {clients} client{'s' if clients > 1 else ''}", "MB/s", m, p, n,
                    "nginx", ">= 0.9x nginx and >= 1.0x proxy", m >= 0.9 * n and m >= p, samples)
            )  # fmt: skip

    # --- 2. cold blob through each proxy vs directly from the upstream ----------------------------------------
    def cold(self) -> None:
        size = self.sizes.cold
        samples: dict[str, list[float]] = {"direct": [], "mirror": [], "proxy": []}
        for rep in range(self.sizes.reps):
            digest = push_random_blob(self.world.upstream_url, f"bench/cold{rep}", size, self.scratch)
            path = f"/v2/bench/cold{rep}/blobs/{digest}"
            quiet_disk()
            samples["direct"].append(download([self.world.upstream_url + path], size).mb_per_s)
            for name, base in self.targets().items():
                quiet_disk()
                samples[name].append(download([base + path], size).mb_per_s)
            say(f"cold round {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in samples.items()))
        m, p, d = (median(samples[k]) for k in ("mirror", "proxy", "direct"))
        self.add(Row(f"cold {human_size(size)} blob, 1 client", "MB/s", m, p, d, "direct", ">= 0.8x direct",
                     m >= 0.8 * d, samples))  # fmt: skip

    # --- 3. herds of concurrent cold GETs of one blob ---------------------------------------------------------
    def herds(self) -> None:
        size = self.sizes.herd
        for clients in (8, 32):
            walls: dict[str, list[float]] = {"mirror": [], "proxy": []}
            gets: dict[str, list[float]] = {"mirror": [], "proxy": []}
            rss: list[float] = []
            for rep in range(self.sizes.reps):
                repo = f"bench/herd{clients}-{rep}"
                digest = push_random_blob(self.world.upstream_url, repo, size, self.scratch)
                for name, base in self.targets().items():
                    quiet_disk()
                    before = self.upstream_gets(digest)
                    with PeakRss(self.world.mirror.proc.pid) as peak:
                        walls[name].append(download([f"{base}/v2/{repo}/blobs/{digest}"] * clients, size).seconds)
                    if name == "mirror":
                        rss.append(peak.mib)
                    gets[name].append(self.settled_gets(digest) - before)
                say(f"herd x{clients} round {rep + 1}: mirror {walls['mirror'][-1]:.2f} s / {gets['mirror'][-1]:g} "
                    f"upstream GETs, proxy {walls['proxy'][-1]:.2f} s / {gets['proxy'][-1]:g} upstream GETs")  # fmt: skip
            m, p = median(walls["mirror"]), median(walls["proxy"])
            one = all(g == 1 for g in gets["mirror"])
            target = "1 upstream GET, <= 0.5x proxy's wall time" if clients == 32 else "1 upstream GET"
            met = one and (m <= 0.5 * p if clients == 32 else True)
            self.add(Row(f"{clients} concurrent cold GETs of a {human_size(size)} blob: wall time", "s", m, p,
                         target=target, met=met, samples=walls))  # fmt: skip
            self.add(Row(f"{clients} concurrent cold GETs: upstream GETs", "GETs", max(gets["mirror"]),
                         max(gets["proxy"]), target="exactly 1", met=one, samples=gets))  # fmt: skip
            if clients == 32:
                self.add(Row("peak RSS of the mirror, 32-client herd", "MiB", max(rss), target=self.rss_target(),
                             met=max(rss) <= 150 * self.workers, samples={"mirror": rss}))  # fmt: skip

    def settled_gets(self, digest: str) -> int:
        """Upstream GETs of ``digest`` once Distribution has written its access log lines."""
        count, deadline = self.upstream_gets(digest), time.monotonic() + 2
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.upstream_gets(digest)
            if now == count:
                break
            count = now
        return count

    # --- 4. small requests at 32 connections ------------------------------------------------------------------
    def small_requests(self) -> None:
        digest, layer = push_small_image(self.world.upstream_url, "bench/small", self.scratch)
        cases = [
            ("manifest GET by digest", f"/v2/bench/small/manifests/{digest}", "GET", ">= 3x proxy", 3.0),
            ("manifest GET by tag (within the tag TTL)", "/v2/bench/small/manifests/v1", "GET", ">= 10x proxy", 10.0),
            ("manifest HEAD by tag", "/v2/bench/small/manifests/v1", "HEAD", "", None),
            ("1 KiB blob GET", f"/v2/bench/small/blobs/{layer}", "GET", ">= 3x proxy", 3.0),
        ]
        for base in self.targets().values():  # warm both caches
            for _, path, _, _, _ in cases:
                wrk(base + path, 1, connections=1, accept=MANIFEST_ACCEPT)
        seconds = self.sizes.wrk_seconds
        ceiling = wrk(self.world.nginx_url + "/small", seconds)
        head_ceiling = ab_head(self.world.nginx_url + "/small", seconds)
        for title, path, method, target, factor in cases:
            samples: dict[str, list[float]] = {"mirror": [], "proxy": []}
            for rep in range(self.sizes.reps):
                for name, base in self.targets().items():
                    load = ab_head if method == "HEAD" else wrk
                    rate = load(base + path, seconds, accept=MANIFEST_ACCEPT)
                    if rate.errors and name == "mirror":
                        raise RuntimeError(f"{title} on {name}: {rate.errors} errors")
                    if rate.errors:  # the proxy's requests that failed or timed out (wrk: 2 s) on a busy machine
                        say(f"{title} on {name}: {rate.errors} errors (counted in the JSON, not in the rate)")
                        samples.setdefault(f"{name} errors", []).append(rate.errors)
                    samples[name].append(rate.requests_per_s)
                say(f"{title} round {rep + 1}: mirror {samples['mirror'][-1]:,.0f}, proxy {samples['proxy'][-1]:,.0f}")
            m, p = median(samples["mirror"]), median(samples["proxy"])
            self.add(Row(f"{title}, 32 connections", "req/s", m, p, target=target,
                         met=None if factor is None else m >= factor * p, samples=samples))  # fmt: skip
        for tool, rate in (("wrk", ceiling), ("ab (HEAD)", head_ceiling)):
            self.add(Row(f"{tool} against nginx, 1 KiB file, 32 connections: the load client's ceiling", "req/s",
                         None, reference=rate.requests_per_s, reference_name="nginx",
                         target="far above the figures above: the client is not the bottleneck"))  # fmt: skip

    # --- 5. a realistic pull: 4 parallel skopeo copy of a 10-layer multi-arch image ---------------------------
    def realistic(self) -> None:
        up = self.world.upstream_url
        cold: dict[str, list[float]] = {"mirror": [], "proxy": []}
        warm: dict[str, list[float]] = {"mirror": [], "proxy": []}
        hosts = {k: v.removeprefix("http://") for k, v in self.targets().items()}
        for rep in range(self.sizes.reps):
            repo = f"bench/app{rep}"
            images = [
                push_tar_image(up, repo, None, [random_files(f"layer{i}.bin", self.sizes.layer) for i in range(10)],
                           arch=arch, docker=True)
                for arch in ("amd64", "arm64")
            ]  # fmt: skip
            push_list(up, repo, "1.0", images, docker=True)
            for name, host in hosts.items():
                cold[name].append(skopeo_pulls(host, f"{repo}:1.0", 4))
            for name, host in hosts.items():
                warm[name].append(skopeo_pulls(host, f"{repo}:1.0", 4))
            say(f"skopeo x4 round {rep + 1}: cold mirror {cold['mirror'][-1]:.2f} s, proxy {cold['proxy'][-1]:.2f} s; "
                f"warm mirror {warm['mirror'][-1]:.2f} s, proxy {warm['proxy'][-1]:.2f} s")  # fmt: skip
        image = f"10 x {human_size(self.sizes.layer)} layers"
        for label, samples in (("cold", cold), ("warm", warm)):
            m, p = median(samples["mirror"]), median(samples["proxy"])
            self.add(Row(f"4 parallel skopeo copy of a multi-arch image ({image}), {label}", "s", m, p,
                         target="(no target; lower is better)", samples=samples))  # fmt: skip

    # --- 6. memory with 16 clients on one big cold blob -------------------------------------------------------
    def memory(self) -> None:
        size = self.sizes.memory
        digest = push_random_blob(self.world.upstream_url, "bench/big", size, self.scratch)
        url = f"{self.world.mirror.url}/v2/bench/big/blobs/{digest}"
        quiet_disk()
        with PeakRss(self.world.mirror.proc.pid) as peak:
            result = download([url] * 16, size)
        say(f"16 clients x {human_size(size)} cold: {result.seconds:.1f} s, {result.mb_per_s:,.0f} MB/s in total")
        processes = f" ({peak.processes} processes together)" if peak.processes > 1 else ""
        self.add(Row(f"peak RSS of the mirror{processes}, 16 clients x a {human_size(size)} cold blob", "MiB",
                     peak.mib, target=self.rss_target(), met=peak.mib <= 150 * self.workers,
                     samples={"mirror": [peak.mib]}))  # fmt: skip

    def rss_target(self) -> str:
        return "<= 150 MiB" if self.workers == 1 else f"<= 150 MiB per worker ({150 * self.workers} MiB)"


def quiet_disk() -> None:
    """Write back what earlier steps left dirty (the uploads of the content), so that every cold measurement
    starts from the same state and neither proxy pays for the setup's writes."""
    os.sync()


WORKLOADS: dict[str, Callable[[Bench], None]] = {
    "cached": Bench.cached,
    "cold": Bench.cold,
    "herds": Bench.herds,
    "small": Bench.small_requests,
    "realistic": Bench.realistic,
    "memory": Bench.memory,
    "wan": wan,
    "workers": workers,
    "bucket": bucket,
    "cluster": cluster,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: about a minute")
    parser.add_argument("--out", default="bench-results", help="writes OUT.json and OUT.md (default bench-results)")
    parser.add_argument("--workdir", help="where the registries and the mirror keep data (default: a temp dir)")
    parser.add_argument("--only", action="append", choices=list(WORKLOADS), help="run only these workloads")
    parser.add_argument("--mirror-flag", action="append", default=None,
                        help="a flag for `mirror serve` (repeatable, e.g. --mirror-flag=--uvloop; default: none, the "
                             "embedded defaults)")  # fmt: skip
    parser.add_argument("--wan-rate", type=float, default=50, help="the WAN link's cap, MB/s each way (default 50)")
    parser.add_argument("--wan-delay", type=float, default=10, help="the WAN link's delay, ms each way (default 10)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    flags = args.mirror_flag or []
    root = Path(args.workdir or tempfile.mkdtemp(prefix="mirror-bench-", dir="/var/tmp"))
    info: dict[str, Any] = {"machine": machine(), "versions": versions(), "mode": "quick" if args.quick else "full",
                            "sizes": asdict(sizes), "mirror_flags": flags,
                            "wan": {"rate_mb_per_s": args.wan_rate, "delay_ms_each_way": args.wan_delay}}  # fmt: skip
    say(
        f"{info['mode']} run on {info['machine']['cores']} cores, load {info['machine']['load_at_start']}; data in {root}"
    )
    started = time.monotonic()
    world = start_world(root, flags)
    bench = Bench(world, sizes, root, Shape(args.wan_rate, args.wan_delay))
    failed: list[str] = []
    try:
        for name in args.only or list(WORKLOADS):
            try:
                if name == "small" and not world.nginx_url:
                    start_static_nginx(world, {"small": _small_file(root)})
                WORKLOADS[name](bench)
            except Exception as exc:  # one workload's failure is reported; the others still run
                say(f"{name} FAILED: {exc!r}")
                failed.append(name)
                bench.add(Row(f"{name}: failed ({exc})", "", None, target="(the workload did not finish)", met=False))
    finally:
        world.stop()
        shutil.rmtree(root, ignore_errors=True)
    info["seconds"] = round(time.monotonic() - started, 1)
    info["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["rows"] = [asdict(r) for r in bench.rows]
    info["failed"] = failed
    report = table(bench.rows)
    Path(args.out + ".json").write_text(dumps(info) + "\n")
    Path(args.out + ".md").write_text(report + "\n")
    print(report)
    met = [r.met for r in bench.rows if r.met is not None]
    say(f"done in {info['seconds']} s: {sum(met)} of {len(met)} targets met; {args.out}.json, {args.out}.md")
    return 1 if failed else 0


def _small_file(root: Path) -> Path:
    path = root / "small-1k"
    path.write_bytes(os.urandom(1024))
    return path
