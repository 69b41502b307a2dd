"""The ``mirror`` command: flags, ``MIRROR_*`` environment and a TOML file become one Config, then a subcommand runs.

``mirror`` with no arguments is ``mirror serve`` with the embedded defaults: listen on 0.0.0.0:5000, cache in
./mirror-data, pull through from Docker Hub.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from mirror import app, log
from mirror.config import DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_TAG_TTL, Config, ConfigError, load


def common_options(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand takes: where the data and the config are, and how to log."""
    parser.add_argument("--config", help="TOML config file (also MIRROR_CONFIG)")
    parser.add_argument("--data-dir", help=f"cache directory (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    parser.add_argument("--log-format", choices=["text", "json"], help="text (default) or one JSON object per line")


def serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})")
    parser.add_argument("--upstream", help="URL of the default upstream (default https://registry-1.docker.io)")
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
        "--upstream-timeout",
        type=float,
        help="seconds to wait for the upstream before answering from the cache or failing (default 10)",
    )
    parser.add_argument("--uvloop", action="store_const", const="true", help="run on uvloop (pip install mirror[fast])")
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
    return parser


def config_from(args: argparse.Namespace) -> Config:
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return load(values, args.config)


def serve(config: Config) -> None:
    if config.uvloop:
        try:
            import uvloop
        except ImportError as exc:
            raise ConfigError("--uvloop needs the uvloop package: pip install 'mirror[fast]'") from exc
        uvloop.install()
    app.run(config)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    try:
        config = config_from(args)
        log.setup(config.log_level, config.log_format)
        if args.command == "serve":
            serve(config)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
