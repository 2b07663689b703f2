"""The MIDI ingestion round trip on the 1,034 Nottingham tunes, and the real MIDI files that ship with packages.

    .venv/bin/python scripts/midi_roundtrip.py [--step 1] [--workers 2] [--out reports/midi_roundtrip.md]

Nottingham: ABC -> abc2midi -> the ingestion job's per-file work (clean, midi2abc, normalise, gate) -> ABC,
compared with the original (chatmusician.ingest.report): as abc2midi plays it, played like a performance
(25 ms jitter, velocity noise), and the hornpipes as abc2midi swings them. Then midi2abc's options compared on
every 10th tune, and the package MIDI files (melody and voices modes) converted and rendered. Writes the
markdown report and a JSON file of every figure beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from chatmusician.corpora import nottingham_tunes
from chatmusician.ingest.config import IngestConfig
from chatmusician.ingest.report import (
    THRESHOLDS,
    as_dicts,
    measure_file,
    package_midi_files,
    run_corpus,
    summarize,
)

ROWS = [
    ("pitch_exact", "exact pitch sequence (top note per onset)", "%"),
    ("onset_f1", "onset+pitch F1 (rejected tunes count 0)", ""),
    ("onset_f1_accepted", "onset+pitch F1, accepted tunes", ""),
    ("meter", "meter agreement", "%"),
    ("key_signature", "key agreement: same key signature", "%"),
    ("key_exact", "key agreement: same tonic and mode", "%"),
    ("pickup", "pickup found (bar lines where the original's are)", "%"),
    ("bar_agreement", "bars matching the meter, accepted tunes", "%"),
    ("snapped", "tunes snapped to the beat grid", "n"),
    ("seconds_p50", "seconds per tune, p50 (one process)", "s"),
]


def _fmt(value, kind: str) -> str:
    if kind == "%":
        return f"{100 * value:.1f} %"
    if kind in ("n", "s"):
        return str(value)
    return f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step", type=int, default=1, help="every STEP-th tune (1 = all 1,034)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="reports/midi_roundtrip.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cfg = IngestConfig()
    tunes = list(enumerate(nottingham_tunes()))[:: args.step]
    hornpipes = [(i, t) for i, t in tunes if "\nR:Hornpipe" in t or "\nR:hornpipe" in t]
    runs = {}
    for name, subset, jitter, strip in (
        ("as played by abc2midi", tunes, False, True),
        ("performance: 25 ms jitter, velocity noise", tunes, True, True),
        ("hornpipes swung by abc2midi (R: kept)", hornpipes, False, False),
    ):
        t0 = time.perf_counter()
        figures = run_corpus(subset, cfg, jitter, args.workers, strip_rhythm=strip)
        runs[name] = (figures, summarize(figures))
        print(f"{name}: {json.dumps(runs[name][1])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    options = {}
    tenth = tunes[::10]
    for name, extra, broken in (("-nb (default)", [], False), ("broken rhythm (no -nb)", [], True),
                                ("-nb -gu", ["-gu"], False)):  # fmt: skip
        variant = dataclasses.replace(
            cfg, convert=dataclasses.replace(cfg.convert, extra_args=extra, broken_rhythm=broken)
        )
        options[name] = summarize(run_corpus(tenth, variant, False, args.workers))
        print(f"midi2abc {name}: {json.dumps(options[name])}", flush=True)
    files = []
    for voices in ("melody", "voices"):
        # the package files are test fixtures, some of 3 notes: no minimum length here
        short = dataclasses.replace(cfg.clean, voices=voices, min_notes=1, min_part_notes=1)
        variant = dataclasses.replace(cfg, clean=short)
        files += [(voices, measure_file(p, variant)) for p in package_midi_files()]
    total = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(runs, options, files, len(tunes), total, args), encoding="utf-8")
    data = {
        "runs": {name: {"summary": s, "tunes": as_dicts(f)} for name, (f, s) in runs.items()},
        "midi2abc_options": options,
        "package_files": [
            {"mode": m, **{k: v for k, v in dataclasses.asdict(f).items() if k != "abc"}} for m, f in files
        ],  # fmt: skip
    }
    out.with_suffix(".json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(f"wrote {out} ({total:.0f} s)")
    clean = runs["as played by abc2midi"][1]
    jittered = runs["performance: 25 ms jitter, velocity noise"][1]
    met = (
        clean["pitch_exact"] >= THRESHOLDS["pitch_exact"]
        and clean["onset_f1"] >= THRESHOLDS["onset_f1"]
        and clean["meter_accepted"] >= THRESHOLDS["meter"]
        and jittered["onset_f1"] >= THRESHOLDS["jitter_onset_f1"]
    )
    return 0 if met else 1


def render_markdown(runs, options, files, n_tunes, total, args) -> str:
    names = list(runs)
    lines = [
        "# MIDI ingestion round trip: Nottingham and package MIDI files",
        "",
        f"Made by `.venv/bin/python scripts/midi_roundtrip.py --step {args.step} --workers {args.workers}` "
        f"in {total / 60:.1f} min on a 2-core machine ({n_tunes} Nottingham tunes).",
        "",
        "Each tune: ABC → abc2midi (with its chord symbols, so the MIDI holds abc2midi's chord and bass "
        "accompaniment too) → the job's per-file work (clean, choose the melody, `midi2abc -aul 8 -nb -k …`, again with `-aul 16` when the gate fails, then both with `-nt` (no triplets), "
        "in the sandbox, normalise, validator + abc2midi round-trip gate) → ABC, played by abc2midi and compared "
        "with the original tune's melody (the tune without chord symbols, played by abc2midi). Onsets are "
        "compared in quarter notes from the first onset, within 1/16 beat; rejected tunes count as misses. "
        "abc2midi swings tunes marked `R:Hornpipe` (2:1), a performance the notation leaves out, so `R:` lines "
        "are removed before the input MIDI is made; the swung hornpipes are measured in their own column.",
        "",
        "| figure | goal | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
        "| tunes / accepted | – | "
        + " | ".join(f"{s['tunes']} / {s['accepted']}" for _, s in runs.values())
        + " |",
    ]
    goals = {"pitch_exact": "≥ 95 %", "onset_f1": "≥ 0.95 (jitter ≥ 0.85)", "meter": "100 %"}
    for key, label, kind in ROWS:
        cells = " | ".join(_fmt(s[key], kind) for _, s in runs.values())
        lines.append(f"| {label} | {goals.get(key, '–')} | {cells} |")
    lines.append(
        "| rejected by reason | – | "
        + " | ".join(
            ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()) or "none"
            for _, s in runs.values()
        )
        + " |"
    )
    lines += ["", "Meter agreement over accepted tunes: "
              + ", ".join(f"{name}: {_fmt(s['meter_accepted'], '%')}" for name, (_, s) in runs.items()) + ".", ""]  # fmt: skip
    clean_figures = runs[names[0]][0]
    misses = [
        f for f in clean_figures if f.reason or not f.pitch_exact or f.onset_f1 < 0.95 or not f.meter_ok
    ]
    lines += [f"## Tunes below a goal, as played by abc2midi ({len(misses)})", "",
              "| # | title | reason | F1 | exact pitches | meter |", "|---:|---|---|---:|---|---|"]  # fmt: skip
    for f in misses[:60]:
        reason = f"{f.reason}: {f.message[:90]}" if f.reason else ""
        lines.append(
            f"| {f.index} | {f.title} | {reason} | {f.onset_f1:.3f} | {f.pitch_exact} | {f.meter_ok} |"
        )
    if len(misses) > 60:
        lines.append(f"| … | {len(misses) - 60} more in the JSON file | | | | |")
    lines += [
        "",
        "## midi2abc options (every 10th tune, as played by abc2midi)",
        "",
        "| options | accepted | exact pitches | onset F1 | pickup | rejected |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, s in options.items():
        rejected = ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()) or "none"
        lines.append(
            f"| {name} | {s['accepted']}/{s['tunes']} | {_fmt(s['pitch_exact'], '%')} | {s['onset_f1']:.4f} "
            f"| {_fmt(s['pickup'], '%')} | {rejected} |"
        )
    lines += [
        "",
        "The MusicXML route (MIDI → MusicXML → xml2abc) was not compared: xml2abc is packaged neither on PyPI "
        "nor in Debian, and music21, the only installed MIDI → MusicXML writer, re-quantises on its own; "
        "midi2abc on a MIDI the job has already cleaned and snapped, with the key and unit given, is what the "
        "figures above measure.",
        "",
        "## MIDI files that ship with packages (music21, partitura)",
        "",
        "Converted with `clean.min_notes=1 clean.min_part_notes=1` (several are test fixtures of a few notes; "
        "the job's defaults reject files under 16 notes as too_short), in both voice modes, each accepted tune "
        "rendered to MIDI and SVG by the render pipeline.",
        "",
        "| file | mode | result | voices | bars | bars matching the meter | round-trip F1 | renders (MIDI+SVG) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for mode, f in files:
        result = "accepted" if not f.reason else f"{f.reason}: {f.message[:80]}"
        lines.append(
            f"| {f.name} | {mode} | {result} | {f.voices or ''} | {f.bars or ''} | "
            f"{_fmt(f.bar_agreement, '%') if not f.reason else ''} | {f'{f.onset_f1:.3f}' if not f.reason else ''} | "
            f"{f.rendered if not f.reason else ''} |"
        )
    return "\n".join(lines) + "\n" + FINDINGS


# Measured on the full run (reports/midi_roundtrip.md); re-read them against the tables after a new run.
FINDINGS = """
## What the figures say

- Goals: exact pitch sequence 98.7 % (≥ 95 %), onset+pitch F1 0.9926 (≥ 0.95), F1 under 25 ms jitter 0.9892
  (≥ 0.85) are met. Meter agreement is 99.4 % over all tunes (the 5 rejected count as misses) and 99.9 % over
  accepted ones: the one accepted miss (Fram Apon Him) changes meter inside its body, which a single-meter
  comparison of the first M: does not follow. The 100 % goal is not met as stated.
- Where F1 falls below 0.95 on accepted tunes, it is mostly triplets: midi2abc writes an 8th-note triplet as
  16th approximations (`F/2ED/2` for `(3FED`) whatever `-ppu` is; the pitches stay right.
- Key: the key signature agrees for 99.5 %; tonic and mode for 90.3 % (a MIDI key signature holds only
  major/minor, so `K:Ador` comes back as `K:G`, the same signature).
- midi2abc options: `-nb` and broken rhythm give the same figures once the job has snapped and straightened the
  timing (so `-nb` stays: it cannot invent `>` from uneven playing); `-gu` (guess the unit) loses half the tunes.
  The unit length 1/8 is tried first and 1/16 when the gate fails: music21's 18-track test04 converts only at 1/16.
- Swing: abc2midi plays hornpipes 2:1; the job writes such pairs as even 8ths (the notation), which is why the
  swung hornpipes reach F1 0.9887 against the notated rhythm.
"""


if __name__ == "__main__":
    sys.exit(main())
