"""A real browser for the page tests: Playwright driving Debian's Chromium (`executable_path`: nothing is downloaded),
headless, with Chromium's background networking off (this machine's network is closed)."""

import contextlib
import shutil
from collections.abc import Iterator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEEDS_CHROMIUM = "needs Debian's chromium (.ci/run installs it)"
_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Every image of the page, and those that did not decode.
IMAGES = """() => { const imgs = [...document.images];
  return {count: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)}; }"""


@contextlib.contextmanager
def page(viewport: dict[str, int] | None = None) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=_FLAGS)
        try:
            yield browser.new_page(viewport=viewport or {"width": 1000, "height": 900})
        finally:
            browser.close()
