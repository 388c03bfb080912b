"""Regenerate the README's pictures of report.html from a fresh demo run.

    python benchmarks/report_figures.py     # writes docs/img/report-*.png

Runs the demo (seed 0) into a temporary directory and saves the PNG plots that
report.html embeds, so the pictures in the README are what the tool produces, and,
when chromium is installed, a screenshot of the whole page rendered headless.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from moonprune.demo import run_demo

OUT = Path(__file__).parents[1] / "docs" / "img"


def screenshot(html: Path, profile: Path) -> None:
    """docs/img/report-screenshot.png from headless chromium, if it is installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium: skipping the page screenshot")
        return
    out = OUT / "report-screenshot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1200,2300", f"--user-data-dir={profile}",
         f"--screenshot={out}", html.resolve().as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    print(f"wrote {out}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(Path(tmp) / "demo", export=False)
        page = (result.out / "report.html").read_text()
        screenshot(result.out / "report.html", Path(tmp) / "profile")
    figures = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    for title, b64 in figures:
        name = "report-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png"
        (OUT / name).write_bytes(base64.b64decode(b64))
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
