"""The cleaned MIDI -> ABC with abcmidi's midi2abc (jailed like the renderer's tools), then normalised to the
training data's style.

midi2abc's quantisation comes from the file's PPQN and ``-aul`` (its ``-b`` is "bars wanted"; ``-gu`` guesses
the unit and hurt badly on the round trip; ``-nb`` avoids spurious broken rhythm; the report compares them). It writes
the key signature in force at the end of the file into K:, so the first key is passed with ``-k``. It labels
the tune ``T: from x.mid``, breaks every bar with a ``\\`` continuation, and adds ``%%MIDI program`` and
comment lines; :func:`normalise` turns that into ``X:`` first, ``K:`` last, a few bars per line.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chatmusician.ingest.config import ConvertConfig
from chatmusician.ingest.midi import Score, key_name
from chatmusician.render.sandbox import ToolRun, run_tool

_FIELD = re.compile(r"^([A-Za-z]):\s*(.*)$")
_LEADING_RESTS = re.compile(r"^(\s*z\d*(?:/\d*)?)+\s*")
_TITLE_BAD = re.compile(r"[%\\\x00-\x1f\x7f]")


class ConvertError(RuntimeError):
    """midi2abc failed; ``reason`` is the manifest's reject reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Converted:
    abc: str
    raw: str
    """midi2abc's own output, for debugging."""
    tool: ToolRun


def midi2abc_argv(midi: str, abc: str, score: Score, cfg: ConvertConfig, unit: int = 8) -> list[str]:
    argv = ["midi2abc", "-f", midi, "-o", abc, "-aul", str(unit)]
    if not cfg.broken_rhythm:
        argv.append("-nb")
    if score.keys and cfg.guess_key != "always":
        argv += ["-k", str(score.keys[0][1])]
    elif cfg.guess_key in ("missing", "always"):
        argv.append("-gk")
    else:
        argv += ["-k", "0"]
    return argv + list(cfg.extra_args)


def tool_failure(run: ToolRun, tool: str) -> str | None:
    if run.timed_out:
        return f"{tool} ran past its time limit and was stopped"
    if sig := run.signal_name:
        return f"{tool} was killed by {sig}"
    return None


def run_midi2abc(midi: bytes, score: Score, cfg: ConvertConfig, unit: int = 8) -> Converted:
    with tempfile.TemporaryDirectory(prefix="chatmusician-ingest-") as tmp:
        job = Path(tmp)
        (job / "in.mid").write_bytes(midi)
        run = run_tool(midi2abc_argv("in.mid", "out.abc", score, cfg, unit), job, cfg.sandbox)
        out = job / "out.abc"
        raw = out.read_text(encoding="utf-8", errors="replace") if out.is_file() else ""
    if why := tool_failure(run, "midi2abc"):
        raise ConvertError("unconvertible", why)
    if run.returncode != 0 or "K:" not in raw or "|" not in raw:
        detail = (run.stdout + run.stderr).strip().splitlines()[-1:] or ["no output"]
        raise ConvertError("unconvertible", f"midi2abc exit {run.returncode}: {detail[0][:200]}")
    return Converted(normalise(raw, score, cfg, unit), raw, run)


def _clean_title(title: str) -> str:
    return _TITLE_BAD.sub(" ", title).strip()[:80]


def normalise(raw: str, score: Score, cfg: ConvertConfig, unit: int = 8) -> str:
    """midi2abc output -> the training data's style: X:1, T: (the MIDI's title, if any), M:, L:, Q:, K: last;
    voices as V: blocks; no comments, %%MIDI lines or continuations; ``bars_per_line`` bars a line; the rests
    put before a pickup taken out again; a final bar line."""
    header: dict[str, str] = {}
    voices: list[tuple[str, list[str]]] = []  # (V: line or "", body lines)
    lines = raw.replace("\r", "").split("\n")
    i = 0
    while i < len(lines):  # header: up to K:
        m = _FIELD.match(lines[i].strip())
        i += 1
        if m:
            header.setdefault(m.group(1), m.group(2).split("%")[0].strip())
            if m.group(1) == "K":
                break
    current: list[str] = []
    voices.append(("", current))
    pending = ""
    for line in lines[i:]:
        line = line.rstrip()
        if not line or line.startswith("%"):
            continue
        m = _FIELD.match(line)
        if m and not pending:
            letter, value = m.group(1), m.group(2).split("%")[0].strip()
            if letter == "V":
                current = []
                voices.append((f"V:{value.split()[0] if value else len(voices)}", current))
            elif letter in "KML" and not current:
                continue  # midi2abc repeats the voice's context before its music (and gets K: wrong)
            elif letter in "KMLQ":
                current.append(f"{letter}:{value}")
            continue
        music = line.split("%")[0].rstrip()
        if music.endswith("\\"):
            pending += music[:-1].rstrip() + " "
            continue
        current.append((pending + music).strip())
        pending = ""
    if pending.strip():
        current.append(pending.strip())
    voices = [(name, body) for name, body in voices if any(not _FIELD.match(b) for b in body)]
    strip_pickup = score.lead_in > 0 and len(voices) == 1
    out = ["X:1"]
    if cfg.keep_title and (title := _clean_title(score.title)):
        out.append(f"T:{title}")
    out.append(f"M:{header.get('M', '4/4')}")
    out.append(f"L:{header.get('L', f'1/{unit}')}")
    if cfg.keep_tempo and header.get("Q"):
        out.append(f"Q:{header['Q']}")
    out.append(f"K:{header.get('K') or key_name(0, False)}")
    for name, body in voices:
        if len(voices) > 1:
            out.append(name)
        out += _reflow(body, cfg.bars_per_line, strip_pickup)
    return "\n".join(out) + "\n"


def _reflow(body: list[str], per_line: int, strip_pickup: bool) -> list[str]:
    """Music lines -> lines of ``per_line`` bars (field lines kept on their own lines), ending with ``|]``."""
    out: list[str] = []
    bars: list[str] = []
    partial = ""
    first = True

    def flush():
        while bars:
            out.append("|".join(bars[:per_line]) + "|")
            del bars[:per_line]

    for line in body:
        if _FIELD.match(line):
            flush()
            if partial.strip():
                out.append(partial.strip())
                partial = ""
            out.append(line)
            continue
        pieces = (partial + " " + line).split("|") if partial else line.split("|")
        partial = pieces.pop()  # text after the last bar line: continues on the next line
        for bar in pieces:
            bar = re.sub(r"\s+", " ", bar.strip())
            if first and strip_pickup:
                bar = _LEADING_RESTS.sub("", bar)
            first = False
            if bar:
                bars.append(bar)
            if len(bars) >= per_line:
                flush()
    if partial.strip():  # the last bar has no bar line of its own
        bars.append(re.sub(r"\s+", " ", partial.strip()))
    flush()
    if out and not _FIELD.match(out[-1]):
        out[-1] = out[-1][:-1] + "|]"
    return out
