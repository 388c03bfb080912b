"""Regenerate the README's pictures of report.html from a fresh demo run.

    python benchmarks/report_figures.py     # writes docs/img/report-*.png

Runs the demo (seed 0) into a temporary directory and saves the PNG plots that
report.html embeds, so the pictures in the README are what the tool produces.
"""

from __future__ import annotations

import base64
import re
import tempfile
from pathlib import Path

from moonprune.demo import run_demo

OUT = Path(__file__).parents[1] / "docs" / "img"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(Path(tmp) / "demo", export=False)
        page = (result.out / "report.html").read_text()
    figures = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    for title, b64 in figures:
        name = "report-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png"
        (OUT / name).write_bytes(base64.b64decode(b64))
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
