"""``python -m tests.bench [--quick] [--json FILE] [--only NAME ...]``: see the package docstring."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import report, workloads
from tests.bench.servers import start_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round each: about a minute")
    parser.add_argument("--rounds", type=int, help="A B rounds per workload (median taken); default 5, quick 1")
    parser.add_argument("--json", default="bench.json", help="where to write the results (default bench.json)")
    parser.add_argument("--work-dir", help="parent of the temporary data dir (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs, stores) after the run")
    parser.add_argument("--only", nargs="*", metavar="WORKLOAD", help=f"run only these: {', '.join(workloads.NAMES)}")
    parser.add_argument(
        "--mirror-flag", action="append", default=[], metavar="FLAG", help="extra flag for `mirror serve` (repeatable)"
    )
    args = parser.parse_args(argv)
    plan = workloads.Plan.quick() if args.quick else workloads.Plan.full()
    if args.rounds:
        plan.rounds = args.rounds
    names = args.only or list(workloads.NAMES)
    unknown = set(names) - set(workloads.NAMES)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-", dir=args.work_dir))
    started = time.monotonic()
    print(f"bench: data in {work}", flush=True)
    servers = start_all(work, args.mirror_flag)
    results: dict[str, object] = {}
    try:
        print(f"bench: upstream {servers.upstream_url}, mirror {servers.mirror.url}, proxy {servers.proxy_url}, "
              f"nginx {servers.nginx_url}", flush=True)  # fmt: skip
        for name in names:
            results[name] = workloads.NAMES[name](servers, plan, work)
    finally:
        servers.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc = report.document(plan, args, results, time.monotonic() - started)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(report.table(doc))
    print(f"\nbench: results in {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
