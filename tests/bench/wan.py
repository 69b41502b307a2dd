"""The workloads on a WAN-shaped upstream (``--only wan``): the mirror and Distribution's proxy reach the upstream
over one shaped link (``tests.support.wan``: a rate cap shared by all connections, a delay each way), the clients
stay on loopback. What users behind one NAT see: a cold pull of a multi-layer image, and herds of clients on one
cold blob, timed, with the bytes that crossed the link read from its counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.bench.load import download, skopeo_pulls
from tests.bench.report import MiB, Row, human_size, median
from tests.bench.world import World, push_random_blob, say
from tests.support.images import push_tar_image, random_files
from tests.support.ops import Mirror, Service, start_registry
from tests.support.wan import Counters, Link

if TYPE_CHECKING:
    from tests.bench.run import Bench


@dataclass(frozen=True)
class Shape:
    rate: float  # MB/s, each way
    delay: float  # ms, each way

    def __str__(self) -> str:
        return f"{self.rate:g} MB/s, {2 * self.delay:g} ms round trip"


@dataclass
class WanWorld:
    """A second mirror and a second Distribution proxy, whose upstream is the far end of the link."""

    link: Link
    mirror: Mirror
    proxy: Service
    proxy_url: str

    def targets(self) -> dict[str, str]:
        return {"mirror": self.mirror.url, "proxy": self.proxy_url}

    def stop(self) -> None:
        for service in (self.mirror, self.proxy):
            service.stop()
        self.link.stop()


def start_wan(world: World, shape: Shape) -> WanWorld:
    port = int(world.upstream_url.rpartition(":")[2])
    link = Link(("127.0.0.1", port), shape.rate * 1e6, shape.delay / 1000)
    flags = ["--log-level", "warning", *world.mirror_flags]
    try:
        mirror = Mirror(world.root / "mirror-wan-data", link.url, *flags, log=world.root / "mirror-wan.log")
    except BaseException:
        link.stop()
        raise
    try:
        proxy, proxy_url = start_registry(world.root / "proxy-wan", proxy_of=link.url)
    except BaseException:
        mirror.stop()
        link.stop()
        raise
    say(f"WAN link {link.url} ({shape}) to the upstream; mirror {mirror.url}, proxy {proxy_url} behind it")
    return WanWorld(link, mirror, proxy, proxy_url)


def wan(bench: Bench) -> None:
    w = start_wan(bench.world, bench.shape)
    try:
        _link_check(bench, w)
        _cold_pull(bench, w)
        _herds(bench, w, _one_client(bench, w))
    finally:
        w.stop()


class _Meter:
    """Bytes down the link during a block."""

    def __init__(self, link: Link):
        self.link = link
        self.moved = Counters(0, 0, 0)

    def __enter__(self) -> _Meter:
        self._before = self.link.counters()
        return self

    def __exit__(self, *exc: object) -> None:
        self.moved = self.link.counters() - self._before


def _link_check(bench: Bench, w: WanWorld) -> None:
    """The link's own rate: one client straight from the upstream over it, with a blob of ``wan_check`` seconds
    of its cap, read from its counters; and the same over an uncapped link without delay (its ceiling)."""
    rate = bench.shape.rate
    size = int(rate * 1e6 * bench.sizes.wan_check)
    port = int(bench.world.upstream_url.rpartition(":")[2])
    bare = Link(("127.0.0.1", port), 0, 0)
    capped: list[float] = []
    uncapped: list[float] = []
    try:
        for rep in range(bench.sizes.reps):
            digest = push_random_blob(bench.world.upstream_url, f"bench/wan-check{rep}", size, bench.scratch)
            path = f"/v2/bench/wan-check{rep}/blobs/{digest}"
            uncapped.append(download([bare.url + path], size).mb_per_s)
            with _Meter(w.link) as meter:
                seconds = download([w.link.url + path], size).seconds
            capped.append(meter.moved.down / seconds / 1e6)
            say(f"WAN link check round {rep + 1}: {capped[-1]:.1f} MB/s (cap {rate:g}), uncapped {uncapped[-1]:,.0f}")
    finally:
        bare.stop()
    measured, ceiling = median(capped), median(uncapped)
    bench.add(Row(f"WAN link check: 1 client straight from the upstream over the link ({bench.shape})", "MB/s", None,
                  reference=measured, reference_name="direct", target=f"within 10% of the cap ({rate:g} MB/s)",
                  met=abs(measured / rate - 1) <= 0.1, samples={"direct": capped}))  # fmt: skip
    bench.add(Row("WAN link uncapped (no cap, no delay): 1 client straight from the upstream", "MB/s", None,
                  reference=ceiling, reference_name="direct", target="the link's ceiling: >= 2x the cap",
                  met=ceiling >= 2 * rate, samples={"direct": uncapped}))  # fmt: skip


def _one_client(bench: Bench, w: WanWorld) -> float:
    """One client's cold GET of the herds' blob size through each proxy and straight over the link; returns the
    mirror's median time (what a herd's wall time is compared with)."""
    size = bench.sizes.wan_herd
    times: dict[str, list[float]] = {"direct": [], "mirror": [], "proxy": []}
    for rep in range(bench.sizes.reps):
        repo = f"bench/wan-one{rep}"
        digest = push_random_blob(bench.world.upstream_url, repo, size, bench.scratch)
        for name, base in {"direct": w.link.url, **w.targets()}.items():
            times[name].append(download([f"{base}/v2/{repo}/blobs/{digest}"], size).seconds)
        say(f"WAN 1 client round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    m, p, d = (median(times[k]) for k in ("mirror", "proxy", "direct"))
    bench.add(Row(f"WAN: 1 cold GET of a {human_size(size)} blob", "s", m, p, d, "direct",
                  "(no target; the base of the herds' target)", samples=times))  # fmt: skip
    return m


def _cold_pull(bench: Bench, w: WanWorld) -> None:
    """``skopeo copy`` to a dir of a cold multi-layer image: through the mirror, through Distribution's proxy,
    and straight from the upstream over the link."""
    layers, layer = bench.sizes.wan_layers, bench.sizes.wan_layer
    hosts = {"direct": w.link.url, **w.targets()}
    times: dict[str, list[float]] = {name: [] for name in hosts}
    moved: dict[str, list[float]] = {name: [] for name in hosts}
    for rep in range(bench.sizes.reps):
        repo = f"bench/wan-app{rep}"
        files = [random_files(f"layer{i}.bin", layer) for i in range(layers)]
        push_tar_image(bench.world.upstream_url, repo, "1.0", files, docker=True)
        for name, base in hosts.items():
            with _Meter(w.link) as meter:
                times[name].append(skopeo_pulls(base.removeprefix("http://"), f"{repo}:1.0", 1))
            moved[name].append(meter.moved.down / MiB)
        say(f"WAN skopeo round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s / {moved[k][-1]:.1f} MiB"
                                                        for k, v in times.items()))  # fmt: skip
    m, p, d = (median(times[k]) for k in ("mirror", "proxy", "direct"))
    image = f"{layers} x {human_size(layer)} layers"
    bench.add(Row(f"WAN: cold skopeo copy of an image ({image})", "s", m, p, d, "direct",
                  "direct's time ÷ mirror's >= 0.95", d / m >= 0.95, times))  # fmt: skip
    bench.add(Row(f"WAN: cold skopeo copy ({image}): bytes down the link", "MiB", median(moved["mirror"]),
                  median(moved["proxy"]), median(moved["direct"]), "direct", "(no target)", samples=moved))  # fmt: skip


def _herds(bench: Bench, w: WanWorld, single: float) -> None:
    """8 and 32 clients at once on one cold blob: wall time, and the bytes down the link in blobs' worth."""
    size = bench.sizes.wan_herd
    for clients in (8, 32):
        walls: dict[str, list[float]] = {"mirror": [], "proxy": []}
        worth: dict[str, list[float]] = {"mirror": [], "proxy": []}
        for rep in range(bench.sizes.reps):
            repo = f"bench/wan-herd{clients}-{rep}"
            digest = push_random_blob(bench.world.upstream_url, repo, size, bench.scratch)
            for name, base in w.targets().items():
                gets = bench.upstream_gets(digest)
                with _Meter(w.link) as meter:
                    walls[name].append(download([f"{base}/v2/{repo}/blobs/{digest}"] * clients, size).seconds)
                worth[name].append(meter.moved.down / size)
                gets = bench.settled_gets(digest) - gets
                say(f"WAN herd x{clients} round {rep + 1}: {name} {walls[name][-1]:.2f} s, {worth[name][-1]:.2f} "
                    f"blobs' worth down the link, {gets} upstream GETs")  # fmt: skip
        m, p = median(walls["mirror"]), median(walls["proxy"])
        title = f"WAN: {clients} concurrent cold GETs of a {human_size(size)} blob"
        if clients == 32:
            bench.add(Row(f"{title}: wall time", "s", m, p, single, "1 client, mirror",
                          "<= 1.2x one client's cold GET through the mirror", m <= 1.2 * single, walls))  # fmt: skip
        else:
            bench.add(Row(f"{title}: wall time", "s", m, p, single, "1 client, mirror", "(no target)",
                          samples=walls))  # fmt: skip
        most = max(worth["mirror"])
        bench.add(Row(f"{title}: bytes down the link", "blobs' worth", most, max(worth["proxy"]),
                      target="one blob's worth (< 1.1: headers and all)", met=most < 1.1, samples=worth))  # fmt: skip
