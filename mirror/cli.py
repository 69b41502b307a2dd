"""The ``mirror`` command: flags, ``MIRROR_*`` environment and a TOML file become one Config, then a subcommand runs.

``mirror`` with no arguments is ``mirror serve`` with the embedded defaults: listen on 0.0.0.0:5000, cache in
./mirror-data, pull through from Docker Hub.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from mirror import app, backends, housekeeping, log
from mirror.config import DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_TAG_TTL, Config, ConfigError, load
from mirror.oci.errors import RegistryError
from mirror.storage.base import StoreUnavailable
from mirror.storage.evictlock import EvictionBusy

DEFAULT_LOCK_TIMEOUT = 120.0  # seconds gc, verify and evict wait while another process on the data dir evicts


def common_options(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand takes: where the data and the config are, and how to log."""
    parser.add_argument("--config", help="TOML config file (also MIRROR_CONFIG)")
    parser.add_argument("--data-dir", help=f"cache directory (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    parser.add_argument("--log-format", choices=["text", "json"], help="text (default) or one JSON object per line")
    parser.add_argument("--cache-size", help="cap on cached content, e.g. 50GiB or 500GB (default: no limit)")


def serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})")
    parser.add_argument("--upstream", help="URL of the default upstream (default https://registry-1.docker.io)")
    parser.add_argument(
        "--add-upstream",
        action="append",
        metavar="REGISTRY=URL",
        help="another upstream, addressed by ?ns=REGISTRY or a /v2/REGISTRY/... prefix, e.g. ghcr.io=https://ghcr.io "
        "(repeatable; [[upstreams]] in the config file for credentials and policies)",
    )
    parser.add_argument("--upstream-username", help="user name for the default upstream")
    parser.add_argument("--upstream-password", help="password or token for the default upstream")
    parser.add_argument("--upstream-password-file", help="file holding the password for the default upstream")
    parser.add_argument(
        "--tag-ttl",
        type=float,
        help=f"seconds a tag -> digest answer is trusted before a HEAD revalidates it (default {DEFAULT_TAG_TTL:g}; "
        "0 = always revalidate)",
    )
    parser.add_argument(
        "--max-stale",
        type=float,
        help="seconds past its TTL a tag may still be served while the upstream is down (default 0 = no limit)",
    )
    parser.add_argument(
        "--max-blob-size", help="largest blob pulled through, e.g. 16GiB (default); larger ones get a 502"
    )
    parser.add_argument(
        "--upstream-timeout",
        type=float,
        help="seconds to wait for the upstream before answering from the cache or failing (default 10)",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        help="serving processes on one port and one data dir, or auto (one per core); default 1",
    )
    parser.add_argument("--uvloop", action="store_const", const="true", help="run on uvloop (pip install mirror[fast])")
    parser.add_argument(
        "--admin-api", action="store_const", const="true", help="serve the JSON admin API at /admin/v1/"
    )
    parser.add_argument(
        "--ui", choices=("on", "off"), help="the web page at /ui/ (default on; off removes it, and the / redirect)"
    )
    push_options(parser)


def push_options(parser: argparse.ArgumentParser) -> None:
    """Local pushes, access control, TLS and webhooks (README "Pushing images")."""
    group = parser.add_argument_group("pushes, access and TLS")
    group.add_argument("--htpasswd", metavar="FILE", help="bcrypt htpasswd file (htpasswd -B): Basic auth on")
    group.add_argument(
        "--no-anonymous-pull",
        dest="anonymous_pull",
        action="store_const",
        const="false",
        help="with --htpasswd: pulls need credentials too",
    )
    group.add_argument(
        "--anonymous-push",
        choices=["loopback", "any", "off"],
        help="without --htpasswd: who may push and delete (default loopback: clients on this host only)",
    )
    group.add_argument("--read-only", action="store_const", const="true", help="refuse every push and delete")
    group.add_argument(
        "--push-prefix",
        dest="push_prefixes",
        action="append",
        metavar="PREFIX",
        help="repeatable: names under PREFIX accept pushes (default: every name but library/ and names already "
        "pulled through)",
    )
    group.add_argument("--upload-max-age", type=float, metavar="SECONDS", help="idle upload sessions are removed")
    group.add_argument("--upload-max-sessions", type=int, metavar="N", help="upload sessions open at once (1024)")
    group.add_argument(
        "--upload-max-sessions-per-client", type=int, metavar="N", help="upload sessions per client address (64)"
    )
    group.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM, chain first)")
    group.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    group.add_argument(
        "--notify-url", dest="notify_urls", action="append", metavar="URL", help="repeatable: webhook for pushes"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through caching mirror for container images.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the registry mirror (the default command)")
    common_options(serve)
    serve_options(serve)
    admin_commands(commands)
    return parser


def config_from(args: argparse.Namespace) -> Config:
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return load(values, args.config)


def serve(config: Config, reread: Callable[[], Config] | None = None) -> None:
    if config.uvloop:
        try:
            import uvloop
        except ImportError as exc:
            raise ConfigError("--uvloop needs the uvloop package: pip install 'mirror[fast]'") from exc
        uvloop.install()
        logging.getLogger(__name__).info("event loop: uvloop %s", importlib.metadata.version("uvloop"))
    app.run(config, reread)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    try:
        config = config_from(args)
        log.setup(config.log_level, config.log_format)
        if args.command == "serve":
            serve(config, lambda: config_from(args))
        elif args.command in ADMIN_COMMANDS:
            return asyncio.run(ADMIN_COMMANDS[args.command](config, args))
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"mirror: {exc.message}", file=sys.stderr)
        return 2 if exc.status < 500 else 1
    except EvictionBusy as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    return 0


# --- admin commands: each opens the data dir beside a running server (diskcache is multi-process safe) ----------
def admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def add(name: str, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help)
        common_options(parser)
        return parser

    add("stats", "size, limit, entries, hit ratio and top repositories").add_argument(
        "--json", action="store_true", help="print JSON"
    )
    add("ls", "what is cached: repositories, tags, platforms, size, last served").add_argument(
        "--json", action="store_true", help="print JSON"
    )
    gc = add("gc", "remove unreferenced blobs, orphaned records and old temp files")
    gc.add_argument("--dry-run", action="store_true", help="list what would go and how many bytes; change nothing")
    verify = add("verify", "re-hash every cached file; quarantine those that do not match their digest")
    evict = add("evict", "evict least recently served content down to the low watermark")
    evict.add_argument("--dry-run", action="store_true", help="list what the next eviction would remove")
    for removing in (gc, verify, evict):
        removing.add_argument(
            "--lock-timeout",
            type=float,
            default=DEFAULT_LOCK_TIMEOUT,
            help="seconds to wait while a server on the data dir (or another command) is evicting "
            f"(default {DEFAULT_LOCK_TIMEOUT:g})",
        )
    for name, help in (("pin", "never evict these images"), ("unpin", "make these images evictable again")):
        add(name, help).add_argument("images", nargs="+", metavar="IMAGE")
    prefetch = add("prefetch", "pull images into the cache ahead of time (e.g. before a CI run)")
    serve_options(prefetch)
    prefetch.add_argument("images", nargs="+", metavar="IMAGE")
    prefetch.add_argument(
        "--platform", action="append", default=[], help="only this platform of multi-platform images (repeatable)"
    )
    cluster = commands.add_parser("cluster", help="the replicas of a cluster ([cluster]): mirror cluster status")
    actions = cluster.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="the replicas alive: address, last seen, fetches under way")
    common_options(status)
    status.add_argument("--json", action="store_true", help="print JSON")


def human(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


class ProgressBar:
    """Progress on stderr: a bar redrawn in place on a terminal, a line every 10% otherwise (CI logs)."""

    def __init__(self, label: str, stream: Any = sys.stderr):
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self._shown = -1

    def __call__(self, done: int, total: int, what: str) -> None:
        percent = 100 * done // total if total else 100
        if self.tty:
            bar = "#" * (percent // 4)
            self.stream.write(f"\r{self.label} [{bar:<25}] {percent:3d}% {human(done)}/{human(total)} {what[:60]:<60}")
            if done >= total:
                self.stream.write("\n")
        elif percent // 10 != self._shown // 10 or done >= total:
            self.stream.write(f"{self.label}: {percent}% ({human(done)} of {human(total)}) {what}\n")
        self._shown = percent
        self.stream.flush()


async def cmd_stats(config: Config, args: argparse.Namespace) -> int:
    async with housekeeping.open_admin(config) as admin:
        stats = await admin.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    limit = stats["limit_bytes"]
    print(f"size        {human(stats['size_bytes'])} of {human(limit) if limit else 'no limit'}")
    print(f"entries     {stats['entries'].get('blob', 0)} blobs, {stats['entries'].get('manifest', 0)} manifests")
    print(f"uploads     {stats['upload_sessions']} sessions holding {human(stats['upload_bytes'])} (in the size)")
    print(f"protected   {human(stats['protected_bytes'])} (pinned or pushed); pins: {', '.join(stats['pins']) or '-'}")
    ratio = stats["hit_ratio"]
    print("hit ratio   " + ", ".join(f"{k} {v:.1%}" if v is not None else f"{k} -" for k, v in ratio.items()))
    served = stats["bytes_served"]
    print(f"served      {human(served['cache'])} from the cache, {human(served['upstream'])} fetched upstream")
    print(f"last served {when(stats['newest_served'])} (oldest entry {when(stats['oldest_served'])})")
    if stats["top_repositories"]:
        print("top repositories:")
        for repo in stats["top_repositories"]:
            hits = sum(v for k, v in repo.items() if k.endswith("_hit"))
            misses = sum(v for k, v in repo.items() if k.endswith("_miss"))
            print(
                f"  {repo['repo']:<50} {hits:>8} hits {misses:>6} misses {human(repo.get('bytes_cache', 0)):>10} served"
            )
    return 0


async def cmd_ls(config: Config, args: argparse.Namespace) -> int:
    async with housekeeping.open_admin(config) as admin:
        repos = await admin.ls()
    if args.json:
        print(json.dumps(repos, indent=2))
        return 0
    for repo in repos:
        print(f"{repo['repo']}  {human(repo['size_bytes'])}  last served {when(repo['last_served'])}")
        for image in repo["tags"] + repo["untagged"]:
            platforms = ", ".join(p["platform"] + ("" if p["cached"] else " (not cached)") for p in image["platforms"])
            name = image.get("tag") or "<untagged>"
            print(
                f"  {name:<24} {image['digest'][:19]}  {human(image['size_bytes']):>10}  "
                f"last served {when(image['last_served'])}" + (f"  [{platforms}]" if platforms else "")
            )
    return 0


def print_removals(result: dict[str, Any], verb: str) -> None:
    for item in result["removed"]:
        print(f"{verb} {item['digest']} {item['kind']} {human(item['size'])} ({item['reason']})")


async def cmd_gc(config: Config, args: argparse.Namespace) -> int:
    async with housekeeping.open_admin(config, lock_timeout=args.lock_timeout) as admin:
        result = await admin.gc(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print_removals(result, verb)
    print(
        f"{verb} {result['removed_count']} files ({human(result['removed_bytes'])}), {result['temp_files']} temp "
        f"files, {result['tags_dropped']} dangling tags; {result['records_dropped']} stale records dropped, "
        f"{result['records_added']} missing records rebuilt"
    )
    return 0


async def cmd_verify(config: Config, args: argparse.Namespace) -> int:
    async with housekeeping.open_admin(config, lock_timeout=args.lock_timeout) as admin:
        result = await admin.verify(ProgressBar("verify"))
    print_removals(result, "quarantined")
    print(f"verified {result['checked']} files; {result['removed_count']} did not match and were quarantined")
    return 1 if result["removed_count"] else 0


async def cmd_evict(config: Config, args: argparse.Namespace) -> int:
    async with housekeeping.open_admin(config, lock_timeout=args.lock_timeout) as admin:
        result = await admin.evict(dry_run=args.dry_run)
    print_removals(result, "would evict" if args.dry_run else "evicted")
    print(
        f"cache {human(result['size_bytes'])}, limit {human(result['limit_bytes']) if result['limit_bytes'] else 'none'}"
        f", target {human(result['target_bytes'])}: {'would evict' if args.dry_run else 'evicted'} "
        f"{result['removed_count']} entries ({human(result['removed_bytes'])})"
    )
    return 0


async def cmd_pin(config: Config, args: argparse.Namespace) -> int:
    async with housekeeping.open_admin(config) as admin:
        for image in args.images:
            result = await (admin.pin(image) if args.command == "pin" else admin.unpin(image))
            state = "pinned" if result["pinned"] else "unpinned"
            print(f"{state} {result['image']}" + ("" if result["changed"] else " (already)"))
    return 0


async def cmd_prefetch(config: Config, args: argparse.Namespace) -> int:
    async with housekeeping.open_admin(config, upstreams=True) as admin:
        failed = 0
        for image in args.images:
            try:
                (result,) = await admin.prefetch([image], args.platform, ProgressBar(f"prefetch {image}"))
            except RegistryError as exc:
                print(f"mirror: {image}: {exc.message}", file=sys.stderr)
                failed += 1
                continue
            print(
                f"{result['image']}: {result['blobs']} blobs, {human(result['bytes'])}, "
                f"{human(result['fetched_bytes'])} fetched in {result['seconds']:.1f}s"
            )
    return 1 if failed else 0


async def cmd_cluster(config: Config, args: argparse.Namespace) -> int:
    """``mirror cluster status``: one line per replica alive (the members' heartbeats in Redis)."""
    try:
        members = await backends.cluster_members(config)
    except StoreUnavailable as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"members": members}, indent=2))
        return 0
    now = time.time()
    for member in members:
        seen, up = now - member["last_seen"], now - member["started_at"]
        print(
            f"{member['id']:<28} {member['advertise']:<40} last seen {seen:4.1f} s ago  "
            f"up {up / 60:.0f} min  {member['fetches']} fetches under way"
        )
    print(f"{len(members)} replica{'s' if len(members) != 1 else ''} alive")
    return 0


ADMIN_COMMANDS = {
    "stats": cmd_stats,
    "ls": cmd_ls,
    "gc": cmd_gc,
    "verify": cmd_verify,
    "evict": cmd_evict,
    "pin": cmd_pin,
    "unpin": cmd_pin,
    "prefetch": cmd_prefetch,
    "cluster": cmd_cluster,
}


if __name__ == "__main__":
    sys.exit(main())
