"""A real headless browser for the viewer tests: Debian's ``chromium`` driven by Playwright's Python client.

Playwright's own browser downloads do not work here (registries only), so the system executable is launched
(``executable_path``). .ci/run installs it (``apt-get install -y chromium``); where it is missing the tests skip
and say why. ``CTIQA_CHROMIUM`` overrides the executable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def chromium_path() -> str:
    """The system Chromium executable, or skip the test with the reason."""
    exe = os.environ.get("CTIQA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe or not os.path.exists(exe):
        pytest.skip("no Chromium on this machine: `apt-get install -y chromium` (Debian) gives the browser these "
                    "tests drive; .ci/run installs it")
    return exe


@contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator:
    """A Playwright page in headless system Chromium (skips without Playwright or Chromium)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed "
                                   "(pip install -e '.[dev]' installs it)")
    exe = chromium_path()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
