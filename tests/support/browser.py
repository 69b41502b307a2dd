"""The web page's browser: Debian's ``chromium`` driven by Playwright (never a downloaded browser build), and a
page visit that fails on a console error, a request to any host but the mirror, or a layout wider than the
window, leaving a screenshot per width."""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, ConsoleMessage, Error, Page, Request, sync_playwright

from tests.support.ops import Mirror, require, start_registry
from tests.support.plain_http import pull, push_random_image

CHROMIUM = "/usr/bin/chromium"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}


DEMO_LAYERS = [os.urandom(300_000), os.urandom(50_000)]


@contextlib.contextmanager
def demo_mirror(workdir: Path) -> Iterator[Mirror]:
    """The overview's test set-up (and the README screenshot's): a real Distribution upstream holding
    ``library/demo:1.0`` and a mirror in front of it (admin API on, a cache size so the watermarks show) after two
    pulls of the image: misses, then hits."""
    registry, url = start_registry(workdir / "registry")
    try:
        push_random_image(url, "library/demo", "1.0", DEMO_LAYERS)
        with Mirror(workdir / "data", url, "--admin-api", "--cache-size", "64MiB") as mirror:
            for _ in range(2):
                pull(mirror.url, "demo", "1.0")
            yield mirror
    finally:
        registry.stop()


def launch() -> Iterator[Browser]:
    """The browser for a module (a fixture yields from this)."""
    if not os.path.exists(CHROMIUM):
        require("chromium")  # skips, or fails under CI=true
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@dataclass
class Visit:
    """What one page load showed and did."""

    page: Page
    status: int
    console_errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def visit(
    browser: Browser, url: str, shots: Path, name: str, sizes: tuple[str, ...] = tuple(SIZES), **context: Any
) -> Iterator[Visit]:
    """Open ``url`` at each width; yields a ``Visit`` per width after checking requests, console and layout."""
    origin = urllib.parse.urlsplit(url).netloc
    for width_name in sizes:
        width, height = SIZES[width_name]
        ctx = browser.new_context(viewport={"width": width, "height": height}, **context)
        page = ctx.new_page()
        errors: list[str] = []
        foreign: list[str] = []

        def on_console(message: ConsoleMessage, errors: list[str] = errors) -> None:
            if message.type == "error":
                errors.append(message.text)

        def on_request(request: Request, foreign: list[str] = foreign) -> None:
            parts = urllib.parse.urlsplit(request.url)
            if parts.scheme != "data" and parts.netloc != origin:
                foreign.append(request.url)

        def on_error(exc: Error, errors: list[str] = errors) -> None:
            errors.append(f"uncaught: {exc}")

        page.on("console", on_console)
        page.on("pageerror", on_error)
        page.on("request", on_request)
        response = page.goto(url)
        assert response is not None
        page.screenshot(path=str(shots / f"{name}-{width_name}.png"), full_page=True)
        shown = Visit(page, response.status, errors, foreign)
        assert not shown.foreign, f"requests to other hosts: {shown.foreign}"
        overflow = page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
        assert not overflow, f"{name} overflows horizontally at {width} px"
        yield shown
        ctx.close()


def shot(page: Page, shots: Path, name: str) -> None:
    """A screenshot of a page reached by clicking (``visit`` takes those of the pages it opens), named by its
    width, and the same layout check."""
    viewport = page.viewport_size or {"width": 0}
    width = next((n for n, (w, _) in SIZES.items() if w == viewport["width"]), str(viewport["width"]))
    page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
    assert not overflow, f"{name} overflows horizontally at {viewport['width']} px"
