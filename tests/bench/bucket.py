"""Hits from object storage: one blob served by the mirror under test (local disk), by a mirror on a SeaweedFS
bucket without the local tier, and by one with it (``[storage] local_cache``), side by side in one run."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from tests.bench.load import download
from tests.bench.report import MiB, Row, human_size, median
from tests.bench.world import push_random_blob, say
from tests.support.ops import Mirror
from tests.support.seaweed import Seaweed, create_bucket, raw_client, seaweed_server

if TYPE_CHECKING:
    from tests.bench.run import Bench

SIZE = 256 * MiB  # the target size
QUICK_SIZE = 32 * MiB


def _config(path: Path, seaweed: Seaweed, prefix: str, local_cache: str | None, redirect: bool = False) -> Path:
    path.write_text(
        f'[storage]\nbackend = "s3"\nendpoint_url = "{seaweed.endpoint_url}"\nbucket = "{seaweed.bucket}"\n'
        f'region = "{seaweed.region}"\nprefix = "{prefix}"\naccess_key = "{seaweed.access_key}"\n'
        f'secret_key = "{seaweed.secret_key}"\n'
        + (f'local_cache = "{local_cache}"\n' if local_cache else "")
        + ("redirect = true\n" if redirect else "")
    )
    return path


def bucket(bench: Bench) -> None:
    world = bench.world
    size = SIZE if bench.sizes.cached > QUICK_SIZE else QUICK_SIZE
    with seaweed_server(world.root / "seaweed") as endpoint_url:
        create_bucket(endpoint_url, "mirror")
        seaweed = Seaweed(endpoint_url, "mirror")
        mirrors = {"disk": world.mirror}
        prefix = f"bench-{secrets.token_hex(4)}/"  # the bucket mirror's: its object is also fetched straight
        try:
            # The redirecting mirror answers hits of the bucket mirror's object with a 307 to a presigned URL.
            for name, cache in (("bucket", None), ("tier", "2GiB"), ("redirect", None)):
                config = _config(world.root / f"mirror-{name}.toml", seaweed, prefix if cache is None else
                                 f"bench-{secrets.token_hex(4)}/", cache, redirect=name == "redirect")  # fmt: skip
                flags = ("--log-level", "warning", "--config", str(config))
                data, log = world.root / f"mirror-{name}-data", world.root / f"mirror-{name}.log"
                mirrors[name] = Mirror(data, world.upstream_url, *flags, log=log)
            say(f"SeaweedFS {endpoint_url}; mirrors on the bucket {mirrors['bucket'].url}, with the tier "
                f"{mirrors['tier'].url}")  # fmt: skip
            _hits(bench, mirrors, size, seaweed, prefix)
        finally:
            for name in ("bucket", "tier", "redirect"):
                if name in mirrors:
                    mirrors[name].stop()


def _hits(bench: Bench, mirrors: dict[str, Mirror], size: int, seaweed: Seaweed, prefix: str) -> None:
    digest = push_random_blob(bench.world.upstream_url, "bench/bucket", size, bench.scratch)
    urls = {name: f"{m.url}/v2/bench/bucket/blobs/{digest}" for name, m in mirrors.items()}
    for name, url in urls.items():  # the fetch: into the disk store, the bucket, the bucket and the tier's copy
        download([url], size, follow=name == "redirect")  # (the redirecting one: a hit of the bucket's object)
    # The bucket's own ceiling here: the bucket mirror's object fetched from SeaweedFS by curl, no mirror between.
    key = f"{prefix}blobs/{digest.replace(':', '/')}"
    params = {"Bucket": seaweed.bucket, "Key": key}
    urls["seaweedfs"] = raw_client(seaweed.endpoint_url).generate_presigned_url("get_object", Params=params)
    samples: dict[str, list[float]] = {name: [] for name in urls}
    for rep in range(bench.sizes.reps * 2):
        for name, url in urls.items():
            samples[name].append(download([url], size, follow=name == "redirect").mb_per_s)
        say(f"bucket hits round {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in samples.items()))
    disk, remote, tier, direct, moved = (
        median(samples[k]) for k in ("disk", "bucket", "tier", "seaweedfs", "redirect")
    )
    bench.add(Row(f"hit of a {human_size(size)} blob from the bucket (no local tier), 1 client", "MB/s", remote,
                  reference=disk, reference_name="local disk", target=">= 0.5x local disk", met=remote >= 0.5 * disk,
                  samples=samples))  # fmt: skip
    bench.add(Row("the same hit from the bucket vs SeaweedFS sending the object itself (curl, no mirror)", "MB/s",
                  remote, reference=direct, reference_name="SeaweedFS", target="(no target: the bucket's ceiling)",
                  samples=samples))  # fmt: skip
    bench.add(Row("the same hit with redirect = true (a 307 to a presigned URL; curl follows it)", "MB/s", moved,
                  reference=disk, reference_name="local disk", target=">= 0.5x local disk", met=moved >= 0.5 * disk,
                  samples=samples))  # fmt: skip
    bench.add(Row(f"hit of a {human_size(size)} blob from the local tier of the bucket, 1 client", "MB/s", tier,
                  reference=disk, reference_name="local disk", target=">= 0.9x local disk", met=tier >= 0.9 * disk,
                  samples=samples))  # fmt: skip
