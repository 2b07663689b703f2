"""Render every tune of every ABC collection in music21's corpus to MIDI and SVG; write the report.

    python scripts/render_music21.py [--every N] [--workers 4] [--out reports]

writes ``reports/render_music21.{md,json}`` (success per collection and in all, every failure with its reasons).
The CI test (tests/test_render_corpus.py) renders a deterministic subset; this script is the full run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatmusician.render.report import corpus_markdown, corpus_report, music21_collections

FORMATS = ["midi", "svg"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=1, help="render every N-th tune of each collection")
    parser.add_argument("--workers", type=int, default=4, help="renders at once (threads over subprocesses)")
    parser.add_argument("--out", default="reports", help="folder for render_music21.{md,json}")
    args = parser.parse_args(argv)
    collections = music21_collections()
    print(f"{sum(map(len, collections.values()))} tunes in {len(collections)} collections", file=sys.stderr)
    report = corpus_report(collections, FORMATS, every=args.every, workers=args.workers)
    command = "python scripts/render_music21.py" + (f" --every {args.every}" if args.every > 1 else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "render_music21.md").write_text(corpus_markdown(report, "music21's ABC collections", command))
    (out / "render_music21.json").write_text(json.dumps(report, indent=2))
    for fmt, s in report["formats"].items():
        print(f"{fmt}: {s['rendered']}/{report['tunes']} = {100 * s['rate']:.2f} %", file=sys.stderr)
    print(f"{sum(report['seconds'].values()):.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
