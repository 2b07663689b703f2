"""MusicPile-sft-style instruction rows derived from one accepted tune (``instruction``, ``input``, ``output``).

continue: the header and the first part of the tune -> the rest; header: a text description of the header
(meter, unit length, key; the original's text-to-music phrasing) -> the tune; harmonize (2+ voices): the
melody voice -> the whole arrangement.
"""

from __future__ import annotations

import re

from chatmusician.prompts import HEADER_LABELS, harmonization, text_to_music

CONTINUE = "Continue the given melody in ABC notation, keeping its meter, key and style."
_FIELD = re.compile(r"^([A-Za-z]):(.*)$")


def split_header(abc: str) -> tuple[list[str], list[str]]:
    """(header lines up to K:, body lines)."""
    lines = abc.strip("\n").split("\n")
    for i, line in enumerate(lines):
        if line.startswith("K:"):
            return lines[: i + 1], lines[i + 1 :]
    return [], lines


def header_fields(header: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in header:
        m = _FIELD.match(line)
        if m and m.group(1) not in fields:
            fields[m.group(1)] = m.group(2).strip()
    return fields


def continue_row(abc: str, fraction: float, min_bars: int) -> dict[str, str] | None:
    """Single-voice tunes: the first ``fraction`` of the bars (whole lines) as input, the rest as output."""
    header, body = split_header(abc)
    if any(line.startswith("V:") for line in body):
        return None
    music = [line for line in body if not _FIELD.match(line)]
    bars = sum(line.count("|") for line in music)
    if bars < min_bars or len(body) < 2:
        return None
    want, seen, cut = bars * fraction, 0, 0
    for i, line in enumerate(body):
        if seen >= want:
            break
        seen += 0 if _FIELD.match(line) else line.count("|")
        cut = i + 1
    if cut >= len(body):
        return None
    return {
        "instruction": CONTINUE,
        "input": "\n".join(header + body[:cut]),
        "output": "\n".join(body[cut:]),
    }


def header_row(abc: str) -> dict[str, str] | None:
    fields = header_fields(split_header(abc)[0])
    description = {HEADER_LABELS[k]: fields[k] for k in ("M", "L", "K") if fields.get(k)}
    if "Key" not in description:
        return None
    return {"instruction": text_to_music(description), "input": "", "output": abc.strip("\n")}


def harmonize_row(abc: str) -> dict[str, str] | None:
    """Voices mode: the first voice (the melody) alone -> the tune with every voice."""
    header, body = split_header(abc)
    starts = [i for i, line in enumerate(body) if line.startswith("V:")]
    if len(starts) < 2:
        return None
    melody = "\n".join(header + body[starts[0] : starts[1]])
    return {"instruction": harmonization(melody), "input": "", "output": abc.strip("\n")}


def sft_rows(abc: str, tasks: list[str], fraction: float, min_bars: int) -> list[tuple[str, dict[str, str]]]:
    """(task name, row) for each task that applies to this tune."""
    makers = {
        "continue": lambda: continue_row(abc, fraction, min_bars),
        "header": lambda: header_row(abc),
        "harmonize": lambda: harmonize_row(abc),
    }
    unknown = sorted(set(tasks) - set(makers))
    if unknown:
        raise ValueError(f"unknown sft tasks {unknown}; choose from {sorted(makers)}")
    rows = []
    for name in tasks:
        row = makers[name]()
        if row is not None:
            rows.append((name, row))
    return rows
