"""How often our bar-duration verdicts agree with abc2midi's warnings, tune by tune, on the Nottingham set.

    .venv/bin/python scripts/abc_agreement.py [--limit N] [--out reports/abc_agreement.md]

For every tune: abc2midi FILE NUMBER -o OUT (it prints warnings and errors on stdout and exits 0) says
"Track 1 Bar 8 has 5 time units while the time signature has 6" when a bar's length is off; we say so
when validate_tune() returns a ``bar_duration`` issue. Prints the agreement and the confusion counts and
writes a markdown report with the disagreements listed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chatmusician.abc import parse_tune, validate_tune
from chatmusician.corpora import nottingham_files, split_tunes

ABC2MIDI_BAR_WARNING = re.compile(r"Bar \d+ has [\d/]+ time units while the time signature has")


@dataclass
class Verdict:
    file: str
    number: int
    ours: bool
    abc2midi: bool
    our_messages: list[str]
    abc2midi_messages: list[str]


def abc2midi_bar_warnings(path: Path, number: int, workdir: Path, timeout_s: float = 20) -> list[str]:
    """abc2midi's bar-length warnings for one tune of a file (always with the tune number and -o)."""
    out = subprocess.run(
        ["abc2midi", str(path), str(number), "-o", str(workdir / "tune.mid")],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=workdir,
    )
    return [line.strip() for line in out.stdout.splitlines() if ABC2MIDI_BAR_WARNING.search(line)]


def verdicts(paths: list[Path], limit: int | None = None) -> list[Verdict]:
    """One verdict pair per tune, in file order (at most ``limit`` tunes)."""
    results: list[Verdict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            for text in split_tunes(path.read_text(encoding="utf-8", errors="replace")):
                if limit is not None and len(results) >= limit:
                    return results
                tune = parse_tune(text)
                if tune.number is None:
                    continue
                ours = [i.message for i in validate_tune(tune) if i.code == "bar_duration"]
                theirs = abc2midi_bar_warnings(path, tune.number, Path(tmp))
                results.append(Verdict(path.name, tune.number, bool(ours), bool(theirs), ours, theirs))
    return results


def confusion(results: list[Verdict]) -> dict[str, int]:
    counts = {"both": 0, "ours_only": 0, "abc2midi_only": 0, "neither": 0}
    for v in results:
        key = (
            "both"
            if v.ours and v.abc2midi
            else "ours_only"
            if v.ours
            else "abc2midi_only"
            if v.abc2midi
            else "neither"
        )
        counts[key] += 1
    return counts


def agreement(counts: dict[str, int]) -> float:
    total = sum(counts.values())
    return 100.0 * (counts["both"] + counts["neither"]) / total if total else 0.0


def _only_in_repeat(results: list[Verdict]) -> int:
    """abc2midi-only verdicts whose every warning came while replaying a repeat."""
    return sum(
        1
        for v in results
        if v.abc2midi and not v.ours and all(m.endswith("in repeat") for m in v.abc2midi_messages)
    )


def markdown_report(results: list[Verdict], seconds: float, max_listed: int = 60) -> str:
    counts = confusion(results)
    lines = [
        "# Bar-duration verdicts: chatmusician.abc vs abc2midi (Nottingham)",
        "",
        f"Tunes compared: {len(results)}. Agreement: **{agreement(counts):.1f} %** "
        f'(a tune "has a bar-duration problem" or not). Run time {seconds:.1f} s.',
        "",
        "Command: `.venv/bin/python scripts/abc_agreement.py`",
        "",
        "| | abc2midi: problem | abc2midi: none |",
        "|---|---:|---:|",
        f"| ours: problem | {counts['both']} | {counts['ours_only']} |",
        f"| ours: none | {counts['abc2midi_only']} | {counts['neither']} |",
        "",
        "## Why they differ",
        "",
        "Both look at one bar at a time. We read the bars as written and tolerate a short bar that opens or",
        "closes the tune or a section (a repeat sign, double bar, ending or P: part next to it: pickups and",
        "their completions). abc2midi checks bars while it plays the repeats and parts, so a pickup joined",
        'to the bar before a repeat or a new part is measured again, which it reports "in repeat".',
        f"Of the {counts['abc2midi_only']} tunes only abc2midi flags, {_only_in_repeat(results)} are flagged",
        'only "in repeat"; in the others abc2midi measures a pickup or closing bar at a P: part change,',
        "an ending or the tune's end, joining the notes on both sides of a P: field into one bar.",
        "",
        "## Disagreements",
        "",
    ]
    disagreements = [v for v in results if v.ours != v.abc2midi]
    for v in disagreements[:max_listed]:
        said = "; ".join(v.our_messages or v.abc2midi_messages)
        who = "ours only" if v.ours else "abc2midi only"
        lines.append(f"- `{v.file}` X:{v.number} ({who}): {said}")
    if len(disagreements) > max_listed:
        lines.append(f"- … and {len(disagreements) - max_listed} more")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="compare only the first N tunes")
    parser.add_argument("--out", default="reports/abc_agreement.md", help="markdown report path")
    args = parser.parse_args(argv)
    paths = nottingham_files()
    start = time.perf_counter()
    results = verdicts(paths, args.limit)
    seconds = time.perf_counter() - start
    counts = confusion(results)
    print(f"tunes: {len(results)}  agreement: {agreement(counts):.1f} %  confusion: {counts}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown_report(results, seconds), encoding="utf-8")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
