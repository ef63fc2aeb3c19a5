"""Markdown reports that the benchmark scripts regenerate.

Hand-written notes below a marker line survive a rewrite, and a table can be
mirrored into README.md between a pair of marker comments.
"""
from __future__ import annotations

from pathlib import Path


def write_keeping_notes(path: Path, text: str, marker: str) -> None:
    """Write ``text`` then ``marker`` to ``path``, keeping what followed ``marker`` in the old file."""
    notes = path.read_text().partition(marker)[2] if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + marker + (notes or "\n"))


def mirror_into_readme(readme: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between the ``begin`` and ``end`` markers of ``readme`` with ``lines``.

    A README without the markers is left alone.
    """
    text = readme.read_text()
    if begin not in text:
        return
    head, _, rest = text.partition(begin)
    readme.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.partition(end)[2])
