"""The workloads of issue 6. Each runs against the mirror and the Distribution proxy in turn (A B, then B A, ...),
takes the median over the rounds and returns rows for the table: ``{"name", "unit", "mirror", "proxy", "ref",
"ref_name", "better", "target", "met", "samples"}``. ``better`` says which way is good ("higher" or "lower")."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.bench.data import push_multiarch, push_random_blob
from tests.bench.load import PeakRss, get, head_rate, parallel_get, parallel_skopeo, rss_kib, wrk
from tests.bench.servers import Servers
from tests.support.ops import OCI_INDEX, OCI_MANIFEST, upstream_requests

MiB = 1 << 20
GiB = 1 << 30
PROXIES = ("mirror", "proxy")


@dataclass
class Plan:
    rounds: int = 5
    cached_size: int = GiB
    cold_size: int = GiB
    herd_size: int = 512 * MiB
    wrk_seconds: float = 6.0
    layers: int = 10
    layer_size: int = 16 * MiB
    pull_clients: int = 4
    memory_size: int = 4 * GiB
    memory_clients: int = 16

    @classmethod
    def full(cls) -> Plan:
        return cls()

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            rounds=1, cached_size=128 * MiB, cold_size=128 * MiB, herd_size=32 * MiB, wrk_seconds=2.0,
            layer_size=MiB, memory_size=256 * MiB,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def orders(rounds: int, names: tuple[str, ...] = PROXIES) -> list[tuple[str, ...]]:
    """A B, B A, A B, ...: each round rotates who goes first."""
    out = []
    for number in range(rounds):
        shift = number % len(names)
        out.append(names[shift:] + names[:shift])
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def row(name: str, unit: str, samples: dict[str, list[float]], better: str, target: str, met: bool | None,
        ref_name: str = "") -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "unit": unit,
        "mirror": median(samples.get("mirror", [])),
        "proxy": median(samples.get("proxy", [])),
        "ref": median(samples[ref_name]) if ref_name in samples else None,
        "ref_name": ref_name,
        "better": better,
        "target": target,
        "met": met,
        "samples": samples,
    }


def settle() -> None:
    """Write dirty pages out before a cold measurement: on this VM the disk takes a few hundred MB/s, and a
    measurement right after a push (or after the other server stored its copy) would pay for that writeback."""
    os.sync()


def blob_url(base: str, repo: str, digest: str) -> str:
    return f"{base}/v2/{repo}/blobs/{digest}"


# --- cached blob throughput, with nginx sendfile of the same file ---------------------------------------------------
def cached(servers: Servers, plan: Plan, work: Path) -> list[dict[str, Any]]:
    repo = "bench/cached"
    say(f"cached: pushing a {plan.cached_size // MiB} MiB blob")
    digest = push_random_blob(servers.upstream_url, repo, plan.cached_size)
    urls = {name: blob_url(servers.url(name), repo, digest) for name in PROXIES}
    urls["nginx"] = servers.nginx_blob_url(digest)
    for name in PROXIES:  # fill both caches, then make sure the second GET is a hit
        for _ in range(2):
            got = get(urls[name])
            assert got.status == 200 and got.size == plan.cached_size, (name, got)
    assert get(urls["nginx"]).size == plan.cached_size
    rows = []
    for clients in (1, 8):
        samples: dict[str, list[float]] = {"mirror": [], "proxy": [], "nginx": []}
        cpu: dict[str, list[float]] = {"mirror": [], "proxy": [], "nginx": []}
        for order in orders(plan.rounds, ("mirror", "proxy", "nginx")):
            for name in order:
                before = servers.cpu_seconds(name)
                result = parallel_get(urls[name], clients, expect=plan.cached_size)
                samples[name].append(result.throughput / 1e9)
                cpu[name].append((servers.cpu_seconds(name) - before) / (result.bytes / GiB))
            say(f"cached x{clients}: " + ", ".join(f"{n} {samples[n][-1]:.2f} GB/s" for n in order))
        m, p, n = (median(samples[k]) for k in ("mirror", "proxy", "nginx"))
        rows.append(
            row(
                f"cached {plan.cached_size // MiB} MiB blob, {clients} client{'s' if clients > 1 else ''}",
                "GB/s",
                samples,
                "higher",
                ">= 0.9x nginx, >= 1.0x proxy",
                m >= 0.9 * n and m >= p,
                "nginx",
            )  # fmt: skip
        )
        rows[-1]["cpu_s_per_gib"] = {k: median(v) for k, v in cpu.items()}
    return rows


# --- cold blob through each proxy vs straight from the upstream ---------------------------------------------------
def cold(servers: Servers, plan: Plan, work: Path) -> list[dict[str, Any]]:
    repo = "bench/cold"
    samples: dict[str, list[float]] = {"mirror": [], "proxy": [], "upstream": []}
    cpu: dict[str, list[float]] = {"mirror": [], "proxy": [], "upstream": []}
    for order in orders(plan.rounds, ("mirror", "proxy", "upstream")):
        digest = push_random_blob(servers.upstream_url, repo, plan.cold_size)
        for name in order:
            settle()
            before = {n: servers.cpu_seconds(n) for n in cpu}
            result = parallel_get(blob_url(servers.url(name), repo, digest), 1, expect=plan.cold_size)
            samples[name].append(result.throughput / 1e9)
            cpu[name].append((servers.cpu_seconds(name) - before[name]) / (result.bytes / GiB))
        say("cold: " + ", ".join(f"{n} {samples[n][-1]:.2f} GB/s" for n in order))
    m, u = median(samples["mirror"]), median(samples["upstream"])
    rows = [
        row(
            f"cold {plan.cold_size // MiB} MiB blob, 1 client",
            "GB/s",
            samples,
            "higher",
            ">= 0.8x upstream",
            m >= 0.8 * u,
            "upstream",
        )  # fmt: skip
    ]
    rows[0]["cpu_s_per_gib"] = {k: median(v) for k, v in cpu.items()}
    return rows


# --- a herd of cold GETs of one blob: wall time and upstream GETs -------------------------------------------------
def upstream_gets(servers: Servers, digest: str) -> int:
    """The upstream's GET count for ``digest``, once its access log has settled (lines are written after each
    response, which may be just after our clients got their last byte)."""
    deadline = time.monotonic() + 5
    count = upstream_requests(servers.upstream_log, "GET", f"/blobs/{digest}")
    stable_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < 0.5:
        time.sleep(0.05)
        now = upstream_requests(servers.upstream_log, "GET", f"/blobs/{digest}")
        if now != count:
            count, stable_since = now, time.monotonic()
    return count


def herd(servers: Servers, plan: Plan, work: Path) -> list[dict[str, Any]]:
    repo = "bench/herd"
    rows = []
    for clients in (8, 32):
        seconds: dict[str, list[float]] = {"mirror": [], "proxy": []}
        gets: dict[str, list[float]] = {"mirror": [], "proxy": []}
        rss: dict[str, list[float]] = {"mirror": [], "proxy": []}
        for order in orders(min(plan.rounds, 3)):  # 3 at most: each round moves clients x size bytes
            digest = push_random_blob(servers.upstream_url, repo, plan.herd_size)
            for name in order:
                settle()
                before = upstream_gets(servers, digest)
                with PeakRss(servers.pid(name)) as peak:
                    result = parallel_get(blob_url(servers.url(name), repo, digest), clients, expect=plan.herd_size)
                seconds[name].append(result.seconds)
                gets[name].append(upstream_gets(servers, digest) - before)
                rss[name].append(peak.peak_mib)
            say(f"herd x{clients}: " + ", ".join(
                f"{n} {seconds[n][-1]:.2f} s, {gets[n][-1]:g} upstream GETs, {rss[n][-1]:.0f} MiB" for n in order))  # fmt: skip
        m, p = median(seconds["mirror"]), median(seconds["proxy"])
        label = f"{clients} cold GETs of one {plan.herd_size // MiB} MiB blob"
        rows.append(row(label + ": wall time", "s", seconds, "lower", "<= 0.5x proxy" if clients == 32 else "",
                        m <= 0.5 * p if clients == 32 else None))  # fmt: skip
        rows.append(row(label + ": upstream GETs", "GETs", gets, "lower", "exactly 1",
                        all(g == 1 for g in gets["mirror"])))  # fmt: skip
        if clients == 32:
            rows.append(row(label + ": peak RSS", "MiB", rss, "lower", "mirror <= 150 MiB",
                            max(rss["mirror"]) <= 150))  # fmt: skip
    return rows


# --- request rates at 32 connections ------------------------------------------------------------------------------
def requests(servers: Servers, plan: Plan, work: Path) -> list[dict[str, Any]]:
    repo = "bench/small"
    say("requests: pushing a small image and a 1 KiB blob")
    image = push_multiarch(servers.upstream_url, repo, "v1", layers=2, layer_size=4096, arches=("amd64",))
    manifest = image.manifests["amd64"]
    small = push_random_blob(servers.upstream_url, repo, 1024)
    accept = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
    paths = {
        "manifest by digest": (f"/v2/{repo}/manifests/{manifest}", "GET", accept, ">= 3x proxy", 3.0),
        "manifest by tag (within TTL)": (f"/v2/{repo}/manifests/v1", "GET", accept, ">= 10x proxy", 10.0),
        "HEAD manifest by tag": (f"/v2/{repo}/manifests/v1", "HEAD", accept, "", 0.0),
        "1 KiB blob": (f"/v2/{repo}/blobs/{small}", "GET", {}, ">= 3x proxy", 3.0),
    }
    for name in PROXIES:  # warm every cache
        for path, _, headers, _, _ in paths.values():
            for _ in range(2):
                got = get(servers.url(name) + path, headers)
                assert got.status == 200, (name, path, got)
    ceiling = [wrk(servers.nginx_url + "/static/1k", plan.wrk_seconds).requests_per_second]
    head_ceiling = [head_rate(servers.nginx_url + "/static/1k", plan.wrk_seconds).requests_per_second]
    say(f"requests: the load clients' ceiling (nginx, static 1 KiB file): wrk {ceiling[0]:.0f} req/s, "
        f"HEAD client {head_ceiling[0]:.0f} req/s")  # fmt: skip
    rows = []
    for label, (path, method, headers, target, factor) in paths.items():
        samples: dict[str, list[float]] = {"mirror": [], "proxy": []}
        errors = 0
        for order in orders(plan.rounds):
            for name in order:
                if method == "HEAD":
                    rate = head_rate(servers.url(name) + path, plan.wrk_seconds, 32, headers)
                else:
                    rate = wrk(servers.url(name) + path, plan.wrk_seconds, 32, method, headers)
                samples[name].append(rate.requests_per_second)
                errors += rate.errors
            say(f"{label}: " + ", ".join(f"{n} {samples[n][-1]:.0f} req/s" for n in order))
        if errors:
            say(f"{label}: {errors} errors (non-2xx or socket)")
        m, p = median(samples["mirror"]), median(samples["proxy"])
        result = row(f"{label}, 32 connections", "req/s", samples, "higher", target,
                     m >= factor * p if factor else None)  # fmt: skip
        result["errors"] = errors
        rows.append(result)
    ceiling.append(wrk(servers.nginx_url + "/static/1k", plan.wrk_seconds).requests_per_second)
    head_ceiling.append(head_rate(servers.nginx_url + "/static/1k", plan.wrk_seconds).requests_per_second)
    rows.append({
        "name": "load client ceiling (HEAD client, nginx static 1 KiB)", "unit": "req/s", "mirror": None,
        "proxy": None, "ref": median(head_ceiling), "ref_name": "nginx", "better": "higher", "target": "",
        "met": None, "samples": {"nginx": head_ceiling},
    })  # fmt: skip
    rows.append({
        "name": "load client ceiling (wrk, nginx static 1 KiB)", "unit": "req/s", "mirror": None, "proxy": None,
        "ref": median(ceiling), "ref_name": "nginx", "better": "higher", "target": "", "met": None,
        "samples": {"nginx": ceiling},
    })  # fmt: skip
    return rows


# --- a realistic pull: 4 parallel skopeo copies of a 10-layer image from a multi-arch index ------------------------
def pull(servers: Servers, plan: Plan, work: Path) -> list[dict[str, Any]]:
    cold_s: dict[str, list[float]] = {"mirror": [], "proxy": []}
    warm_s: dict[str, list[float]] = {"mirror": [], "proxy": []}
    for number, order in enumerate(orders(plan.rounds)):
        repo = f"bench/pull{number}"
        image = push_multiarch(servers.upstream_url, repo, "v1", plan.layers, plan.layer_size, ("amd64", "arm64"))
        for name in order:
            settle()
            source = f"{servers.url(name).removeprefix('http://')}/{repo}:v1"
            cold_s[name].append(parallel_skopeo(source, plan.pull_clients, work))
            warm_s[name].append(parallel_skopeo(source, plan.pull_clients, work))
        say("pull: " + ", ".join(f"{n} cold {cold_s[n][-1]:.2f} s warm {warm_s[n][-1]:.2f} s" for n in order))
    size = f"{image.layer_bytes / MiB:.0f} MiB"
    return [
        row(f"{plan.pull_clients} x skopeo copy, {plan.layers} layers ({size}), cold", "s", cold_s, "lower", "", None),
        row(f"{plan.pull_clients} x skopeo copy, {plan.layers} layers ({size}), warm", "s", warm_s, "lower", "", None),
    ]


# --- peak RSS: 16 clients x one big cold blob ----------------------------------------------------------------------
def memory(servers: Servers, plan: Plan, work: Path) -> list[dict[str, Any]]:
    repo = "bench/memory"
    say(f"memory: pushing a {plan.memory_size // MiB} MiB blob")
    digest = push_random_blob(servers.upstream_url, repo, plan.memory_size)
    rss: dict[str, list[float]] = {"mirror": [], "proxy": []}
    seconds: dict[str, list[float]] = {"mirror": [], "proxy": []}
    for name in PROXIES:
        settle()
        with PeakRss(servers.pid(name)) as peak:
            result = parallel_get(
                blob_url(servers.url(name), repo, digest), plan.memory_clients, expect=plan.memory_size
            )
        rss[name].append(peak.peak_mib)
        seconds[name].append(result.seconds)
        say(f"memory: {name} {plan.memory_clients} x {plan.memory_size // MiB} MiB cold in {result.seconds:.1f} s, "
            f"peak RSS {peak.peak_mib:.0f} MiB")  # fmt: skip
    hwm = rss_kib(servers.pid("mirror"), "VmHWM") / 1024
    label = f"{plan.memory_clients} cold GETs of one {plan.memory_size // MiB} MiB blob"
    rows = [
        row(label + ": wall time", "s", seconds, "lower", "", None),
        row(label + ": peak RSS", "MiB", rss, "lower", "mirror <= 150 MiB", max(rss["mirror"]) <= 150),
    ]
    rows[-1]["mirror_vmhwm_mib"] = hwm
    return rows


NAMES: dict[str, Callable[[Servers, Plan, Path], list[dict[str, Any]]]] = {
    "cached": cached,
    "cold": cold,
    "herd": herd,
    "requests": requests,
    "pull": pull,
    "memory": memory,
}
