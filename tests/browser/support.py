"""What the browser tests share: the dashboard server's token and the screenshots they keep."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page

TOKEN = "dashboard-s3cret"
ARTIFACTS = Path(__file__).parent.parent / "artifacts"
# Listed at the end of the run (see conftest's pytest_terminal_summary).
saved: list[Path] = []


def save_screenshot(page: Page, name: str) -> Path:
    """Keep a full-page screenshot under tests/artifacts/ (git ignores it) and say where."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=path, full_page=True)
    saved.append(path)
    print(f"screenshot: {path}")
    return path
