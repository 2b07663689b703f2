"""Render a whole corpus concurrently and report success per format, with every failure and its reasons.

``python -m chatmusician.render.report`` writes ``reports/render_nottingham.{md,json}`` for the 1,034
Nottingham tunes (MIDI + SVG); ``python scripts/render_music21.py`` writes ``reports/render_music21.{md,json}``
for every ABC collection in music21's corpus. The corpus tests do the same (music21: a deterministic subset)
and check the rates.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from chatmusician.render.config import RenderConfig
from chatmusician.render.pipeline import RenderRequest, render

_TITLE = re.compile(r"^T:\s*(.*)$", re.MULTILINE)


@dataclass
class TuneOutcome:
    index: int
    title: str
    rendered: list[str]
    errors: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """``stage code`` of each warning (recovered tool errors, sanitizer notes)."""
    seconds: float = 0.0


def render_one(index: int, tune: str, formats: list[str], config: RenderConfig) -> TuneOutcome:
    result = render(RenderRequest(tune, list(formats)), config)
    title = m.group(1).strip() if (m := _TITLE.search(tune)) else ""
    warnings = [f"{w['stage']} {w['code']}" for w in result.warnings]
    return TuneOutcome(index, title, sorted(result.outputs), result.errors, warnings, result.timings["total"])


def render_corpus(
    tunes: list[str], formats: list[str], config: RenderConfig | None = None, workers: int = 4
) -> list[TuneOutcome]:
    """Render every tune; threads suffice because each render waits on sandboxed subprocesses."""
    config = config or RenderConfig()
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda it: render_one(it[0], it[1], formats, config), enumerate(tunes)))


def summarize(outcomes: list[TuneOutcome], formats: list[str], corpus: str) -> dict:
    """Success count and rate per format, the failures with their errors, and the commonest error codes."""
    total = len(outcomes)
    per_format = {}
    for fmt in formats:
        ok = sum(fmt in o.rendered for o in outcomes)
        per_format[fmt] = {"rendered": ok, "failed": total - ok, "rate": ok / total if total else 0.0}
    failures = [
        {
            "index": o.index,
            "title": o.title,
            "missing": [f for f in formats if f not in o.rendered],
            "errors": o.errors,
        }
        for o in outcomes
        if any(f not in o.rendered for f in formats)
    ]
    codes = Counter(e["code"] for o in outcomes for e in o.errors)
    warnings = Counter(w for o in outcomes for w in set(o.warnings))
    return {
        "corpus": corpus,
        "tunes": total,
        "formats": per_format,
        "tunes_with_warnings": sum(bool(o.warnings) for o in outcomes),
        "warnings_per_tune": dict(warnings.most_common()),
        "error_codes": dict(codes.most_common()),
        "failures": failures,
    }


def to_markdown(summary: dict) -> str:
    lines = [
        f"# Render report: {summary['corpus']}",
        "",
        f"{summary['tunes']} tunes; {summary['tunes_with_warnings']} rendered with warnings "
        "(recovered tool errors, underfull lines…).",
        "",
        "| format | rendered | failed | success |",
        "|---|---:|---:|---:|",
    ]
    for fmt, s in summary["formats"].items():
        lines.append(f"| {fmt} | {s['rendered']} | {s['failed']} | {100 * s['rate']:.2f} % |")
    lines += ["", "## Warnings (tunes that rendered with each)", "", "| stage code | tunes |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in summary["warnings_per_tune"].items()]
    lines += ["", f"## Failures ({len(summary['failures'])})", ""]
    if not summary["failures"]:
        lines.append("None.")
    for f in summary["failures"]:
        lines.append(f"- tune {f['index']} *{f['title']}*, missing {', '.join(f['missing'])}:")
        for e in f["errors"]:
            where = f" (line {e['line']}, column {e['column']})" if e.get("line") else ""
            lines.append(f"  - {e['stage']} `{e['code']}`{where}: {e['message']}")
    return "\n".join(lines) + "\n"


def write_report(summary: dict, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(to_markdown(summary))
    js.write_text(json.dumps(summary, indent=2))
    return md, js


def music21_collections() -> dict[str, list[str]]:
    """Every ABC collection in music21's corpus (Essen included: it is only read here, never trained on or
    shipped) -> its tunes, files sorted, tunes in file order."""
    import music21

    from chatmusician.corpora import music21_abc_files, read_tunes

    corpus = Path(music21.__file__).parent / "corpus"
    names = sorted({p.relative_to(corpus).parts[0] for p in corpus.rglob("*.abc")})
    return {name: read_tunes(music21_abc_files((name,))) for name in names}


def corpus_report(
    collections: dict[str, list[str]], formats: list[str], every: int = 1, workers: int = 4
) -> dict:
    """Render every ``every``-th tune of each collection; one summary per collection plus the totals."""
    summaries, seconds = {}, {}
    for name, tunes in collections.items():
        start = time.perf_counter()
        picked = tunes[::every]
        outcomes = render_corpus(picked, formats, workers=workers)
        for o in outcomes:
            o.index *= every  # the tune's position in its collection
        summaries[name] = summarize(outcomes, formats, name)
        seconds[name] = time.perf_counter() - start
    total = sum(s["tunes"] for s in summaries.values())
    totals = {
        fmt: {
            "rendered": (ok := sum(s["formats"][fmt]["rendered"] for s in summaries.values())),
            "failed": total - ok,
            "rate": ok / total if total else 0.0,
        }
        for fmt in formats
    }
    return {"tunes": total, "every": every, "formats": totals, "collections": summaries, "seconds": seconds}


def corpus_markdown(report: dict, title: str, command: str) -> str:
    lines = [
        f"# Render report: {title}",
        "",
        f"{report['tunes']} tunes"
        + (f" (every {report['every']}th)" if report["every"] > 1 else " (all)")
        + f"; made by `{command}`. Success is judged from the output (the MIDI parses, plays notes and lasts "
        "about what the bars say; the SVG parses and has staves); tool messages are warnings.",
        "",
        "| collection | tunes | "
        + " | ".join(f"{f} rendered | {f} success" for f in report["formats"])
        + " | s |",
        "|---|---:|" + "---:|---:|" * len(report["formats"]) + "---:|",
    ]
    for name, s in report["collections"].items():
        cells = " | ".join(f"{v['rendered']} | {100 * v['rate']:.2f} %" for v in s["formats"].values())
        lines.append(f"| {name} | {s['tunes']} | {cells} | {report['seconds'][name]:.0f} |")
    cells = " | ".join(f"{v['rendered']} | **{100 * v['rate']:.2f} %**" for v in report["formats"].values())
    lines += [f"| **all** | {report['tunes']} | {cells} | {sum(report['seconds'].values()):.0f} |", ""]
    for s in report["collections"].values():
        body = to_markdown(s).split("\n## Warnings", 1)[1]
        lines += [f"## {s['corpus']}", "", "### Warnings" + body.replace("\n## Failures", "\n### Failures")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from chatmusician.corpora import nottingham_tunes

    out_dir = (argv if argv is not None else sys.argv[1:])[:1] or ["reports"]
    formats = ["midi", "svg"]
    summary = summarize(render_corpus(nottingham_tunes(), formats), formats, "Nottingham (ABC_cleaned)")
    md, _ = write_report(summary, out_dir[0], "render_nottingham")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
