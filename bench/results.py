"""The one place benchmarks record their numbers: print a section and append it to RESULTS.md."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def publish(text: str, *, append: bool = True) -> None:
    """Print `text`; unless told not to, append it to bench/RESULTS.md as a new section."""
    print(text)
    if not append:
        return
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    sep = "\n" if body.endswith("\n") else "\n\n"
    with RESULTS.open("a") as f:  # append only: every benchmark adds its own dated section
        f.write(sep + text.rstrip("\n") + "\n")
