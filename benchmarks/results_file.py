"""Write one script's section of benchmarks/RESULTS.md, leaving the others alone.

Each benchmark script owns the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``; rerunning a script replaces only its own section.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "# moonprune benchmark results\n\n"
    "Every section below is written by the script it names; rerun the command to "
    "regenerate it. Numbers are as measured, including the disappointing ones.\n"
)


def update_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) section ``name`` of ``path`` with ``text``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    current = path.read_text() if path.exists() else HEADER
    if start in current and end in current:
        before, _, rest = current.partition(start)
        _, _, after = rest.partition(end)
        # ``block`` ends its own end-marker line; what followed that line (a blank line
        # before the next section, say) stays as it was
        current = before + block + after.removeprefix("\n")
    else:
        current = current.rstrip() + "\n\n" + block
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(current)
    tmp.replace(path)
