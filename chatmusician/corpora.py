"""The real ABC tunes the project uses offline: the Nottingham set shipped in the package, and music21's corpus.

Both are read by the tokenizer factory, the tests, the quickstart and the benchmarks (no hub, no sibling folder).
The Nottingham tunes live in ``chatmusician/assets/nottingham`` with their GPLv3 licence and provenance
(``SOURCE.txt``); music21's collections come with its wheel (BSD).
"""

from __future__ import annotations

import re
from pathlib import Path

NOTTINGHAM_DIR = Path(__file__).parent / "assets" / "nottingham"
# Essen is licensed for non-commercial use only: kept out of anything we train on or ship.
MUSIC21_COLLECTIONS = ("ryansMammoth", "oneills1850", "airdsAirs", "miscFolk")
_TUNE_START = re.compile(r"^X:", re.MULTILINE)


def nottingham_files() -> list[Path]:
    """The 14 Nottingham ABC files (1,034 tunes), sorted."""
    return sorted(NOTTINGHAM_DIR.glob("*.abc"))


def music21_abc_files(collections: tuple[str, ...] = MUSIC21_COLLECTIONS) -> list[Path]:
    """ABC files bundled in music21's wheel, sorted (Essen excluded by default: non-commercial licence)."""
    import music21

    corpus = Path(music21.__file__).parent / "corpus"
    return sorted(p for c in collections for p in (corpus / c).rglob("*.abc"))


def split_tunes(text: str) -> list[str]:
    """Split a multi-tune ABC file at its ``X:`` lines (file headers before the first tune are dropped)."""
    starts = [m.start() for m in _TUNE_START.finditer(text)]
    return [
        text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(text)], strict=True) if text[a:b].strip()
    ]


def read_tunes(paths: list[Path]) -> list[str]:
    return [tune for p in paths for tune in split_tunes(p.read_text(encoding="utf-8", errors="replace"))]


def nottingham_tunes() -> list[str]:
    return read_tunes(nottingham_files())
