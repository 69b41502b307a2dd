"""Regenerate README's screenshot of the overview (``docs/ui-overview.png``) from the browser test's set-up
(``tests.support.browser.demo_mirror``: a real Distribution upstream, a mirror, two pulls of an image), in
Debian's chromium at the desktop width the tests use::

    python -m tests.integration.screenshot            # writes docs/ui-overview.png
    python -m tests.integration.screenshot --out x.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.support.browser import demo_mirror, launch, visit
from tests.support.ops import REPO_ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "ui-overview.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-screenshot-") as workdir:
        shots = Path(workdir) / "shots"
        shots.mkdir()
        with demo_mirror(Path(workdir)) as mirror:
            for browser in launch():
                for shown in visit(browser, mirror.url + "/ui/", shots, "overview", sizes=("desktop",)):
                    assert shown.status == 200 and not shown.console_errors, shown.console_errors
                    shown.page.screenshot(path=str(args.out), full_page=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
