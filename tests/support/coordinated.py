"""``python -m tests.support.coordinated serve ARGS``: ``mirror serve ARGS`` with blob fetches coordinated across
the processes sharing the data dir (``Config.coordination = "files"``, an internal setting with no flag yet), so
that tests can run several mirrors on one data dir (``Mirror(..., entry=COORDINATED)``)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from mirror import cli, log


def main(argv: Sequence[str]) -> int:
    args = cli.build_parser().parse_args(list(argv))
    config = dataclasses.replace(cli.config_from(args), coordination="files")
    log.setup(config.log_level, config.log_format)
    cli.serve(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
