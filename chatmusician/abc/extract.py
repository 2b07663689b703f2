"""Find ABC tunes in free text (model output, chat replies, files) and normalize them.

Handles: ``X:`` with or without a number or a space, tunes with no ``X:`` line (a header block that
ends with ``K:``), fenced code blocks, prose before/between/after tunes, several tunes, and the SFT
data's single-line form where header fields run together (``X:1 L:1/16 M:2/4 K:G G2BG A2cA|``).
Every tune comes out starting with ``X:<n>``, one header field per line, then its body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from chatmusician.abc.fields import KEY_START, parse_key
from chatmusician.abc.issues import ERROR, WARNING, Issue

NO_ABC = "no ABC found"
HEADER_LETTERS = frozenset("ABCDFGHIKLMNOPQRSTUVWXZmrsw")
_BODY_FIELD_LETTERS = frozenset("IKLMmNPQRrsTUVWw")
_FENCE = re.compile(r"^\s*(```|~~~)")
_X_LINE = re.compile(r"^X[ \t]*:[ \t]*")
_FIELD_AT = re.compile(r"([A-Za-z]):[ \t]*")
_NEXT_FIELD = re.compile(r"\s+(?=[A-Za-z]:)")
_KEY_MODIFIER_AFTER = re.compile(r"\s+[A-Za-z][\w-]*=\S+")
# Letters that appear in music lines: notes, rests, the spacer. A word with two or more other letters
# ("the", "tune", "Here") is prose; "TcB" (trill on c) is not.
_MUSIC_LETTERS = frozenset("abcdefgABCDEFGzxZXyuv")  # u, v: up/down-bow decorations
_NOT_WORDS = re.compile(r'"[^"]*"|![^!]*!|\[[A-Za-z]:[^\]]*\]|%.*')


@dataclass
class ExtractResult:
    """Tunes found in a text, normalized, plus what was noticed on the way."""

    tunes: list[str] = field(default_factory=list)
    """Normalized tunes, each starting with an "X:<n>" line, one header field per line."""
    issues: list[Issue] = field(default_factory=list)
    """Warnings about repairs (X: added, header split, ...); one error "no_abc_found" when nothing found."""
    source_lines: list[list[int]] = field(default_factory=list)
    """Per tune, the 1-based input line of each of its lines (to map a tune's issues back to the input)."""

    @property
    def found(self) -> bool:
        return bool(self.tunes)

    @property
    def message(self) -> str:
        return (
            NO_ABC if not self.tunes else f"found {len(self.tunes)} tune{'s' if len(self.tunes) > 1 else ''}"
        )

    def to_dict(self) -> dict:
        return {
            "tunes": self.tunes,
            "found": self.found,
            "message": self.message,
            "issues": [i.to_dict() for i in self.issues],
        }


def _prose_words(line: str) -> int:
    words = re.findall(r"[A-Za-z]{2,}", _NOT_WORDS.sub(" ", line))
    return sum(1 for w in words if sum(ch not in _MUSIC_LETTERS for ch in w) >= 2)


def is_music_line(line: str) -> bool:
    """A line of notes (not prose): bar lines and few prose words, or note letters and no prose words."""
    s = line.strip()
    if not s:
        return False
    if "|" in s:
        return _prose_words(s) < 3
    return _prose_words(s) == 0 and re.search(r"[A-Ga-gzxZ]|::|\]", _NOT_WORDS.sub(" ", s)) is not None


def is_prose_line(line: str) -> bool:
    """Words, not notes: ends a tune's body. Lenient: anything with an ABC symbol and no prose stays."""
    s = line.strip()
    if not s:
        return False
    if _prose_words(s) >= (3 if "|" in s else 1):
        return True
    return re.search(r'[A-Ga-gzxZ|:\]\["\\!]', s) is None


def split_fields(line: str) -> tuple[list[tuple[str, str]], str]:
    """Header fields at the start of ``line`` and the music after them.

    ``"X:1 L:1/16 M:2/4 K:G G2BG A2cA |"`` -> ``([("X","1"), ("L","1/16"), ("M","2/4"), ("K","G")], "G2BG A2cA |")``.
    A line holding one field keeps its whole value (``"T:The A: Tune"`` stays one title).
    """
    s = _X_LINE.sub("X:", line.strip(), count=1)
    fields: list[tuple[str, str]] = []
    pos, rest = 0, ""
    while (m := _FIELD_AT.match(s, pos)) is not None:
        letter, start = m.group(1), m.end()
        if letter == "K":
            value, rest = _split_key(s[start:])
            fields.append(("K", value))
            break
        nxt = _NEXT_FIELD.search(s, start)
        fields.append((letter, s[start : nxt.start() if nxt else len(s)].strip()))
        if nxt is None:
            break
        pos = nxt.end()
    letters = {letter for letter, _ in fields}
    run_together = len(fields) > 1 and letters <= HEADER_LETTERS and bool(letters & set("XKLM"))
    if fields and not run_together:
        if fields[0][0] == "K":  # a lone K: line, possibly with music after the key
            return fields[:1], rest
        m = _FIELD_AT.match(s)
        return [(m.group(1), s[m.end() :].strip())], ""
    return fields, rest


def _split_key(text: str) -> tuple[str, str]:
    """(key, music) for what follows "K:": the whole text when it reads as a key, else the key's prefix."""
    try:
        parse_key(text)
        return text.strip(), ""
    except ValueError:
        pass
    m = KEY_START.match(text)
    if m is not None and not is_music_line(text[m.end() :]):
        return text.strip(), ""  # an unreadable key, not a key followed by music: validation reports it
    if m is None:
        value, _, rest = text.strip().partition(" ")
        return value, rest.strip()
    end = m.end()
    while (mod := _KEY_MODIFIER_AFTER.match(text, end)) is not None:
        end = mod.end()
    return text[:end].strip(), text[end:].strip()


def _is_field_line(line: str) -> bool:
    return re.match(r"^\s*[A-Za-z][ \t]*:", line) is not None and not line.lstrip().startswith("|")


class _Region:
    """Lines between code fences, with two facts per line computed once, backwards (keeps every scan
    linear, also on hostile input such as a megabyte of field lines)."""

    def __init__(self, lines: list[tuple[int, str]]):
        self.lines = lines
        n = len(lines)
        self.block_has_key = [False] * (n + 1)
        """[i]: the block of field/comment lines starting at line i holds a K: field."""
        self.key_ahead = [False] * (n + 1)
        """[i]: a K: line follows line i before a blank line or the next X: line."""
        for i in range(n - 1, -1, -1):
            s = lines[i][1].strip()
            if s.startswith("%"):
                self.block_has_key[i] = self.block_has_key[i + 1]
            elif s and _is_field_line(s):
                letters = {letter for letter, _ in split_fields(s)[0]}
                self.block_has_key[i] = "K" in letters or (
                    letters <= HEADER_LETTERS and self.block_has_key[i + 1]
                )
            following = lines[i + 1][1].strip() if i + 1 < n else ""
            if following and not _X_LINE.match(following):
                self.key_ahead[i] = following.startswith("K:") or self.key_ahead[i + 1]

    def starts_tune(self, i: int) -> bool:
        s = self.lines[i][1].strip()
        return _X_LINE.match(s) is not None or (_is_field_line(s) and self.block_has_key[i])


@dataclass
class _Draft:
    first_line: int
    number: str | None = None
    header: list[tuple[int, str]] = field(default_factory=list)  # (input line, text)
    body: list[tuple[int, str]] = field(default_factory=list)
    has_key: bool = False
    has_fields: bool = False
    blank_lines_removed: bool = False


def _collect(region: _Region, i: int, issues: list[Issue]) -> tuple[_Draft | None, int]:
    """Read one tune starting at line ``i``; returns it (None when it has neither key nor music) and
    the index where reading stopped."""
    lines = region.lines
    draft = _Draft(first_line=lines[i][0])
    in_body = False
    j = i
    while j < len(lines):
        number, raw = lines[j]
        s = raw.strip()
        if j > i and _X_LINE.match(s):
            break
        if not s:
            if not in_body:
                break
            k = j
            while k < len(lines) and not lines[k][1].strip():
                k += 1
            if k < len(lines) and is_music_line(lines[k][1]) and not region.starts_tune(k):
                if not draft.blank_lines_removed:  # one warning per tune is enough
                    message = "blank line(s) inside a tune removed"
                    issues.append(Issue(WARNING, "blank_line_in_tune", message, number))
                draft.blank_lines_removed = True
                j = k
                continue
            break
        if s == "%":
            pass  # an empty comment (what sanitize() leaves of a removed line): nothing to keep
        elif s.startswith("%"):
            (draft.body if in_body else draft.header).append((number, s))
        elif not in_body and _is_field_line(s):
            fields, rest = split_fields(s)
            if len(fields) > 1:
                issues.append(
                    Issue(WARNING, "split_header", "header fields on one line split one per line", number, 1)
                )
            for letter, value in fields:
                if letter == "X" and draft.number is None and not draft.has_fields:
                    draft.number = value
                else:
                    draft.header.append((number, f"{letter}:{value}"))
                draft.has_fields = True
                draft.has_key = draft.has_key or letter == "K"
            if rest:
                draft.body.append((number, rest))
            in_body = draft.has_key or bool(rest)
        elif in_body and _is_field_line(s) and s[0] in _BODY_FIELD_LETTERS:
            if s[0] == "T" and region.block_has_key[j]:
                break  # a title opening a header block that ends in K: starts the next tune (no X:)
            draft.body.append((number, raw.rstrip()))
        elif not in_body and draft.has_fields and region.key_ahead[j]:
            draft.header.append((number, s))  # a stray line inside the header: kept, validation flags it
        elif (in_body and not is_prose_line(s)) or is_music_line(s):
            draft.body.append((number, raw.rstrip()))
            in_body = True
        else:
            break  # prose ends the tune
        j += 1
    if not draft.has_key and not any(is_music_line(line) for _, line in draft.body):
        return None, max(j, i + 1)
    return draft, max(j, i + 1)


def _regions(lines: list[tuple[int, str]]) -> list[tuple[bool, list[tuple[int, str]]]]:
    """The text cut at code fences: (inside a fence, lines)."""
    regions: list[tuple[bool, list[tuple[int, str]]]] = [(False, [])]
    for number, line in lines:
        if _FENCE.match(line):
            regions.append((not regions[-1][0], []))
            continue
        regions[-1][1].append((number, line))
    return [r for r in regions if r[1]]


def _extract(text: str) -> ExtractResult:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    lines = list(enumerate(text.split("\n"), start=1))
    issues: list[Issue] = []
    drafts: list[_Draft] = []
    for fenced, region_lines in _regions(lines):
        region, before, i = _Region(region_lines), len(drafts), 0
        while i < len(region_lines):
            if not region.starts_tune(i):
                i += 1
                continue
            draft, i = _collect(region, i, issues)
            if draft is not None:
                drafts.append(draft)
        if fenced and len(drafts) == before:  # a code block of bare music: keep it, header-less
            music = [(number, line.rstrip()) for number, line in region_lines if is_music_line(line)]
            if any("|" in line for _, line in music):
                message = "code block with music but no header: X: added, no K:"
                issues.append(Issue(WARNING, "no_header", message, region_lines[0][0]))
                drafts.append(_Draft(first_line=region_lines[0][0], body=music))
    tunes, source_lines = [], []
    for index, draft in enumerate(drafts, start=1):
        number = draft.number.strip() if draft.number else ""
        if not re.fullmatch(r"\d+", number):
            issues.append(
                Issue(
                    WARNING, "added_number", f"tune without an X: number numbered {index}", draft.first_line
                )
            )
            number = str(index)
        lines_out = [(draft.first_line, f"X:{int(number)}"), *draft.header, *draft.body]
        tunes.append("\n".join(text for _, text in lines_out))
        source_lines.append([number for number, _ in lines_out])
    if not tunes:
        issues.append(Issue(ERROR, "no_abc_found", NO_ABC))
    return ExtractResult(tunes, sorted(issues, key=lambda i: (i.line or 0, i.column or 0)), source_lines)


def extract_tunes(text: str) -> ExtractResult:
    """Every ABC tune in ``text``, normalized; "no ABC found" (not an exception) when there is none."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    try:
        return _extract(str(text))
    except Exception as e:  # noqa: BLE001 - callers get a result, never a traceback
        return ExtractResult(
            [], [Issue(ERROR, "internal_error", f"extraction failed: {type(e).__name__}: {e}")]
        )
