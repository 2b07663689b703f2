"""Where the real ABC tunes live on this machine: the Nottingham set in ../shared/data and music21's corpus.

Both are used offline by the tokenizer factory, the tests and the benchmarks (DESIGN.md, "Offline rule").
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

NOTTINGHAM_SUBDIR = Path("nottingham-dataset") / "ABC_cleaned"
# Essen is licensed for non-commercial use only: kept out of anything we train on or ship.
MUSIC21_COLLECTIONS = ("ryansMammoth", "oneills1850", "airdsAirs", "miscFolk")
_TUNE_START = re.compile(r"^X:", re.MULTILINE)


@cache
def shared_data_dir() -> Path | None:
    """``$CHATMUSICIAN_SHARED_DATA``, else the first ``shared/data`` found beside or above the package."""
    env = os.environ.get("CHATMUSICIAN_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        for candidate in (parent / "shared" / "data", parent.parent / "shared" / "data"):
            if (candidate / NOTTINGHAM_SUBDIR).is_dir():
                return candidate
    return None


def nottingham_files() -> list[Path]:
    """The 14 Nottingham ABC files (1,034 tunes), sorted; empty when shared data is absent."""
    root = shared_data_dir()
    return sorted((root / NOTTINGHAM_SUBDIR).glob("*.abc")) if root else []


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
