"""Command lines of the render tools and how to read what they say.

Pure functions: which arguments each tool gets, how its messages parse into (severity, line, column, text), and
which of its error messages are known to leave the output intact (``recoverable``, seen on the Nottingham
tunes; a hint for callers such as MIDI ingestion). The renderer does not go by that list: it judges each output
by the file itself (:mod:`chatmusician.render.judge`) and returns every message as a warning when the file is
usable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# abc2midi prints on stdout:  "Error in line-char 7-12 : Malformed note"  (line 1-based, char 0-based).
_ABC2MIDI_MESSAGE = re.compile(r"^(Error|Warning) in line-char (\d+)-(\d+)\s*:\s*(.*)$")
# abcm2ps prints on stderr:  "tune.abc:6:13: error: Bad character"  (line 1-based, column 0-based).
_ABCM2PS_MESSAGE = re.compile(r"^[^:\n]*:(\d+):(\d+): (error|warning): (.*)$")
_ABCM2PS_PLAIN = re.compile(r"^(error|warning): (.*)$", re.IGNORECASE)

# Errors after which the tool carries on and its output still holds every note (seen on real tunes):
# chord-symbol spelling, dangling ties, unusual repeat structure, ignored decorations.
ABC2MIDI_RECOVERABLE = re.compile(
    r"Unrecognized chord name|Guitar chord does not start|Could not find note to be tied|"
    r"found another \|: after a \|:|found \[1 or like before \|:|found :: before \|:|Attempt to nest chords|"
    r"field in header should go after K|in middle of line ignored|No repeat expected",
    re.IGNORECASE,
)
ABCM2PS_RECOVERABLE = re.compile(
    r"Bad tie|Not a note|Chord not closed|Note too much dotted|Line too much shrunk|Line underfull|"
    r"Decoration .* not (defined|terminated)|Decoration not terminated|Bad character|Too many ties",
    re.IGNORECASE,
)
# abcm2ps -g gives up on long tunes with this; page mode (-v) renders them.
ABCM2PS_BUFFER_FULL = re.compile(r"Output buffer overflow", re.IGNORECASE)


@dataclass(frozen=True)
class ToolMessage:
    """One message of a tool, with 1-based line and column within the rendered tune where the tool gave them."""

    severity: str  # "error" | "warning"
    message: str
    line: int | None = None
    column: int | None = None
    recoverable: bool = False
    """An error the tool recovered from (reported as a warning when the output is otherwise good)."""


def abc2midi_argv(abc: str, midi: str, tune_number: int = 1) -> list[str]:
    """Always the tune number and ``-o``: without them a multi-tune file writes one MIDI per tune (docs/TOOLS.md)."""
    return ["abc2midi", abc, str(tune_number), "-o", midi]


def abcm2ps_argv(abc: str, out_svg: str, pages: bool = False) -> list[str]:
    """``-g``: one SVG per tune (``<stem>001.svg``); ``-v``: one SVG per page, for tunes too long for ``-g``."""
    return ["abcm2ps", "-v" if pages else "-g", "-O", out_svg, abc]


def fluidsynth_argv(
    soundfont: str, midi: str, wav: str, sample_rate: int, gain: float, effects: bool = True
) -> list[str]:
    """Fast (non-realtime) rendering to a WAV file, no shell, no MIDI input driver, quiet."""
    argv = ["fluidsynth", "-ni", "-q", "-g", f"{gain:g}", "-r", str(sample_rate)]
    argv += [] if effects else ["-R", "0", "-C", "0"]
    return argv + ["-F", wav, soundfont, midi]


def lame_argv(wav: str, mp3: str, bitrate_kbps: int, quality: int = 7) -> list[str]:
    return ["lame", "--quiet", "-b", str(bitrate_kbps), "-q", str(quality), wav, mp3]


def rsvg_argv(svg: str, png: str, zoom: float) -> list[str]:
    """White background (a transparent score is unreadable in dark viewers)."""
    return ["rsvg-convert", "--format=png", "--background-color=white", f"--zoom={zoom:g}", "-o", png, svg]


def parse_abc2midi(stdout: str) -> list[ToolMessage]:
    messages = []
    for raw in stdout.splitlines():
        m = _ABC2MIDI_MESSAGE.match(raw.strip())
        if m:
            kind, line, char, text = m.groups()
            severity = kind.lower()
            recoverable = severity == "error" and bool(ABC2MIDI_RECOVERABLE.search(text))
            messages.append(ToolMessage(severity, text.strip(), int(line), int(char) + 1, recoverable))
    return messages


def parse_abcm2ps(stderr: str) -> list[ToolMessage]:
    messages = []
    for raw in stderr.splitlines():
        raw = raw.strip()
        m = _ABCM2PS_MESSAGE.match(raw)
        if m:
            line, col, severity, text = m.groups()
            line_no, col_no = int(line), int(col) + 1
        elif m := _ABCM2PS_PLAIN.match(raw):
            severity, text = m.group(1).lower(), m.group(2)
            line_no = col_no = None
        else:
            continue
        recoverable = severity == "error" and bool(ABCM2PS_RECOVERABLE.search(text))
        messages.append(ToolMessage(severity, text.strip(), line_no, col_no, recoverable))
    return messages
