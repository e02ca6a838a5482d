"""Headless Chromium for the HTML pages' tests: the system's own browser (Debian's ``chromium``), via Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def system_chromium() -> str | None:
    """The system's Chromium (Debian's ``chromium`` package), if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@dataclass
class OpenPage:
    """A page open in headless Chromium, offline, and what it said on its console and asked of the network."""

    page: Any  # playwright.sync_api.Page
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@contextmanager
def open_offline(path: Path, ready: str) -> Iterator[OpenPage]:
    """``path`` loaded in Chromium with the network off, once the JavaScript expression ``ready`` is true.

    Skips the test when no Chromium is installed.
    """
    executable = system_chromium()
    if executable is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium); the page is not tried in a browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        try:
            context = chromium.new_context(offline=True, viewport={"width": 1280, "height": 900})
            tab = context.new_page()
            opened = OpenPage(tab)
            tab.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: opened.errors.append(str(e)))
            tab.on("request", lambda r: opened.requests.append(r.url))
            tab.goto(path.as_uri())
            tab.wait_for_function(ready, timeout=30_000)
            yield opened
        finally:
            chromium.close()
