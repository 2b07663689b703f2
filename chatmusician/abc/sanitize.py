"""Make ABC text safe for the external tools (abc2midi, abcm2ps, ...) before they see it.

Two jobs: strip what makes the tools read files or copy raw PostScript/SVG/HTML into their output
(docs/TOOLS.md), and enforce size/complexity limits (``AbcLimits``) so that a tiny input cannot ask for
hours of MIDI or a parser's worst case. Line-based and linear in the input; never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from chatmusician.abc.config import AbcLimits
from chatmusician.abc.fields import parse_tempo_bpm
from chatmusician.abc.issues import ERROR, WARNING, Issue, has_errors

# "%%name arg" (or the old single-% spelling "%MIDI ..." that abc2midi also reads).
_DIRECTIVE = re.compile(r"^[ \t]*(?:%%[ \t]*|%(?=[A-Za-z]))([A-Za-z][\w.-]*)[ \t]*(\S*)")
_INSTRUCTION_LINE = re.compile(r"^[ \t]*I:")
_INLINE_INSTRUCTION = re.compile(r"\[I:[^\]\n]*\]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff]")
_TUNE_START = re.compile(r"^[ \t]*X:")
_FIELD_LINE = re.compile(r"^[ \t]*([A-Za-z+]):(.*)$")
_INLINE_FIELD = re.compile(r"\[([A-Za-z]):([^\]\n]*)\]")
# Parts of a music line whose digits are not note lengths: comments, quoted chord symbols and
# annotations, !decorations!, inline fields.
_NOT_LENGTHS = re.compile(r'%.*|"[^"\n]*"|![^!\n]*!|\[[A-Za-z]:[^\]\n]*\]')
_BAR_LINE = re.compile(r"\|+")


@dataclass
class SanitizeResult:
    """Safe ABC plus what was removed or found over a limit."""

    text: str
    """The ABC with forbidden directives (and I: fields) removed, each removed line left as a bare "%"
    comment so that line numbers match the input; empty when the input was too large."""
    issues: list[Issue] = field(default_factory=list)
    """A warning per stripped directive, an error per limit exceeded."""

    @property
    def ok(self) -> bool:
        """True when no limit was exceeded (stripped directives are warnings)."""
        return not has_errors(self.issues)


def _forbidden(name: str, arg: str, forbidden: list[str]) -> bool:
    for entry in forbidden:
        words = entry.lower().split()
        if words and words[0] == name.lower() and (len(words) == 1 or words[1] == arg.lower()):
            return True
    return False


REMOVED_LINE = "%"
"""What a removed line becomes: an empty comment, so that line numbers stay those of the input."""


def _strip_directives(lines: list[str], limits: AbcLimits, issues: list[Issue]) -> list[tuple[int, str]]:
    """Lines as (1-based line number in the input, text), removed ones replaced by REMOVED_LINE."""
    kept: list[tuple[int, str]] = []
    block_end: str | None = None  # inside a forbidden %%beginX block: the directive that ends it
    block_start = 0
    for number, line in enumerate(lines, start=1):
        m = _DIRECTIVE.match(line)
        if block_end is not None:
            if m and m.group(1).lower() == block_end:
                block_end = None
            kept.append((number, REMOVED_LINE))
            continue
        if m and _forbidden(m.group(1), m.group(2), limits.forbidden_directives):
            name = m.group(1)
            if name.lower().startswith("begin"):
                block_end, block_start = "end" + name.lower()[5:], number
                message = f"removed the %%{name} block (raw output)"
            else:
                message = f"removed %%{name} {m.group(2)}".rstrip() + " (reads files or emits raw output)"
            issues.append(Issue(WARNING, "forbidden_directive", message, number, 1))
            kept.append((number, REMOVED_LINE))
            continue
        if limits.strip_instruction_fields:
            if _INSTRUCTION_LINE.match(line):
                issues.append(Issue(WARNING, "instruction_field", "removed an I: field", number, 1))
                kept.append((number, REMOVED_LINE))
                continue
            inline = _INLINE_INSTRUCTION.search(line)
            if inline:
                issues.append(
                    Issue(
                        WARNING,
                        "instruction_field",
                        "removed an inline [I:] field",
                        number,
                        inline.start() + 1,
                    )
                )
                line = _INLINE_INSTRUCTION.sub("", line)
        kept.append((number, line))
    if block_end is not None:
        issues.append(
            Issue(
                WARNING,
                "unclosed_block",
                f"%%{block_end} missing: removed everything after line {block_start}",
                block_start,
                1,
            )
        )
    return kept


class _FirstOnly:
    """Collects one issue per (tune, code), counting the repeats in the message."""

    def __init__(self) -> None:
        self.found: dict[tuple[int, str], tuple[Issue, int]] = {}

    def add(self, tune: int, issue: Issue) -> None:
        first, count = self.found.get((tune, issue.code), (issue, 0))
        self.found[(tune, issue.code)] = (first, count + 1)

    def issues(self) -> list[Issue]:
        out = []
        for first, count in self.found.values():
            more = f" (and {count - 1} more)" if count > 1 else ""
            out.append(Issue(first.severity, first.code, first.message + more, first.line, first.column))
        return out


def _blank_out(match: re.Match) -> str:
    return " " * len(match.group())


def _check_limits(kept: list[tuple[int, str]], limits: AbcLimits) -> list[Issue]:
    found = _FirstOnly()
    tune_starts = [number for number, line in kept if _TUNE_START.match(line)]
    if len(tune_starts) > limits.max_tunes:
        found.add(
            0,
            Issue(
                ERROR,
                "too_many_tunes",
                f"{len(tune_starts)} tunes (X: fields); the limit is {limits.max_tunes}",
                tune_starts[limits.max_tunes],
                1,
            ),
        )
    tune = 0
    bars: dict[int, int] = {}
    voices: dict[int, set[str]] = {}
    for number, line in kept:
        if _TUNE_START.match(line):
            tune = min(tune + 1, limits.max_tunes + 1)  # past the limit, one error per code is enough
        if len(line) > limits.max_line_chars:
            found.add(
                tune,
                Issue(
                    ERROR,
                    "line_too_long",
                    f"line of {len(line)} characters; the limit is {limits.max_line_chars}",
                    number,
                    limits.max_line_chars + 1,
                ),
            )
            continue
        fields = [(m.group(1), m.group(2), m.start(2)) for m in [_FIELD_LINE.match(line)] if m]
        if not fields and not line.lstrip().startswith("%"):
            fields = [(m.group(1), m.group(2), m.start(2)) for m in _INLINE_FIELD.finditer(line)]
            music = _NOT_LENGTHS.sub(_blank_out, line)
            bars[tune] = bars.get(tune, 0) + len(_BAR_LINE.findall(music))
            digits = re.search(rf"\d{{{limits.max_note_length_digits + 1},}}", music)
            if digits:
                message = (
                    f"length number {digits.group()[:12]} has over {limits.max_note_length_digits} digits"
                )
                found.add(tune, Issue(ERROR, "note_length_too_long", message, number, digits.start() + 1))
        for letter, value, start in fields:
            if letter == "V" and value.split():
                voices.setdefault(tune, set()).add(value.split()[0])
            elif letter == "Q":
                try:
                    bpm = parse_tempo_bpm(value)
                except ValueError:
                    continue  # unreadable tempo: validate_tune reports it
                if bpm is not None and not limits.min_tempo_bpm <= bpm <= limits.max_tempo_bpm:
                    message = f"tempo {bpm} bpm is outside {limits.min_tempo_bpm}-{limits.max_tempo_bpm}"
                    found.add(tune, Issue(ERROR, "tempo_out_of_range", message, number, start + 1))
    for tune_no, count in bars.items():
        if count > limits.max_bars:
            line = tune_starts[tune_no - 1] if tune_no else 1
            found.add(
                tune_no,
                Issue(
                    ERROR,
                    "too_many_bars",
                    f"{count} bar lines in one tune; the limit is {limits.max_bars}",
                    line,
                    1,
                ),
            )
    for tune_no, ids in voices.items():
        if len(ids) > limits.max_voices:
            line = tune_starts[tune_no - 1] if tune_no else 1
            found.add(
                tune_no,
                Issue(
                    ERROR,
                    "too_many_voices",
                    f"{len(ids)} voices in one tune; the limit is {limits.max_voices}",
                    line,
                    1,
                ),
            )
    return found.issues()


def sanitize(text: str, limits: AbcLimits | None = None) -> SanitizeResult:
    """Strip forbidden directives (a warning each) and check ``limits`` (an error each); never raises."""
    limits = limits or AbcLimits()
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    text = str(text)
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_input_bytes:
        message = f"input of {size} bytes; the limit is {limits.max_input_bytes}"
        return SanitizeResult("", [Issue(ERROR, "input_too_large", message)])
    issues: list[Issue] = []
    text = text.encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates -> "?"
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    controls = len(_CONTROL.findall(text))
    if controls:
        text = _CONTROL.sub("", text)
        issues.append(Issue(WARNING, "control_characters", f"removed {controls} control character(s)"))
    kept = _strip_directives(text.split("\n"), limits, issues)
    issues += _check_limits(kept, limits)
    issues.sort(key=lambda i: (i.line or 0, i.column or 0))
    return SanitizeResult("\n".join(line for _, line in kept), issues)
