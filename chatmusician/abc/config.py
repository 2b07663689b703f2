"""Configs of the ABC notation core: the limits that sanitize() enforces and the ``abc-check`` command.

Dataclasses only (no parsing code here), so that the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

# Directives that make abcm2ps/abc2midi read files or copy raw PostScript/SVG/HTML into their output
# (docs/TOOLS.md: both tools honour %%abc-include; abcm2ps copies %%beginsvg blocks, <script> included).
# A "begin..." entry removes the whole block up to its "%%end..." line.
DEFAULT_FORBIDDEN_DIRECTIVES = [
    "abc-include",  # abcm2ps + abc2midi: reads any file
    "format",  # abcm2ps: reads a format file
    "EPS",  # abcm2ps: embeds an EPS file
    "postscript",  # abcm2ps: raw PostScript line
    "beginps",  # abcm2ps: raw PostScript block
    "beginsvg",  # abcm2ps: raw SVG block, copied verbatim (scripts too)
    "beginml",  # abcm2ps: raw XHTML block
    "deco",  # abcm2ps: decoration defined by PostScript code
    "glyph",  # abcm2ps: PostScript glyph mapping
    "musicfont",  # abcm2ps: @font-face URL in the SVG (a fetch in the viewer's browser)
    "MIDI ptstress",  # abc2midi: reads a stress-model file
]


@dataclass
class AbcLimits:
    """Limits enforced on ABC text before any external tool sees it (defaults fit a render service)."""

    max_input_bytes: int = 200_000
    """Largest accepted input, in UTF-8 bytes (a long multi-voice tune is ~20 kB)."""
    max_tunes: int = 20
    """Most tunes (X: fields) in one input."""
    max_note_length_digits: int = 3
    """Most digits in one note/rest length number (A999 passes, A9999 is rejected: hours-long MIDI)."""
    min_tempo_bpm: int = 20
    """Slowest accepted Q: tempo, in beats per minute."""
    max_tempo_bpm: int = 400
    """Fastest accepted Q: tempo, in beats per minute."""
    max_bars: int = 2000
    """Most bar lines in one tune, all voices together."""
    max_voices: int = 16
    """Most distinct voices (V: ids) in one tune."""
    max_line_chars: int = 10_000
    """Longest accepted line, in characters (parsing cost grows with line length)."""
    forbidden_directives: list[str] = field(default_factory=lambda: list(DEFAULT_FORBIDDEN_DIRECTIVES))
    """%%directives stripped with a warning (case-insensitive; "NAME ARG" matches a first argument too)."""
    strip_instruction_fields: bool = True
    """Strip I: fields (lines and inline [I:...]): they are %%directives in another spelling."""


@dataclass
class AbcCheckConfig:
    """Check ABC files: sanitize, extract tunes, validate; print one JSON object per tune; exit 1 on errors."""

    POSITIONAL: ClassVar[str] = "inputs"  # `chatmusician abc-check a.abc b.abc` (or `-`)
    POSITIONAL_LIST: ClassVar[bool] = True

    inputs: list[str] = field(default_factory=lambda: ["-"])
    """Files to check ("-" reads standard input); each may hold model output, one tune or a tune book."""
    tune_index: int | None = None
    """Check only the tune at this position in each input, 0 = the first, as ``render`` counts (default: every tune)."""
    limits: AbcLimits = field(default_factory=AbcLimits)
    """Limits applied to each input before parsing."""
