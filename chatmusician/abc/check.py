"""``chatmusician abc-check``: sanitize, extract and validate ABC files; one JSON object per tune on stdout.

Positions are mapped back to the input file's lines. Exit status 1 when any error was found.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from chatmusician.abc.config import AbcCheckConfig, AbcLimits
from chatmusician.abc.extract import extract_tunes
from chatmusician.abc.issues import ERROR, Issue, has_errors
from chatmusician.abc.parse import parse_tune
from chatmusician.abc.sanitize import sanitize
from chatmusician.abc.validate import validate_tune


def _report(source: str, tune: int | None, issues: list[Issue], **extra) -> dict:
    return {
        "input": source,
        "tune": tune,
        **extra,
        "ok": not has_errors(issues),
        "errors": sum(i.severity == ERROR for i in issues),
        "warnings": sum(i.severity != ERROR for i in issues),
        "issues": [i.to_dict() for i in issues],
    }


def _to_input_line(issue: Issue, source_lines: list[int]) -> Issue:
    if issue.line is None or issue.line < 1 or not source_lines:
        return issue
    return replace(issue, line=source_lines[min(issue.line, len(source_lines)) - 1])


def check_text(
    text: str, limits: AbcLimits | None = None, tune_index: int | None = None, source: str = "-"
) -> list[dict]:
    """Reports for one input: one for the input itself when sanitizing/extracting found something, then
    one per tune (only tune ``tune_index``, 0-based as everywhere, when given); ``tune`` is that 0-based index.
    An input with no ABC text at all is the ``empty_input`` error, as ``render`` says it."""
    if not text.strip():
        return [_report(source, None, [Issue(ERROR, "empty_input", "the input holds no ABC text")])]
    cleaned = sanitize(text, limits)
    found = extract_tunes(cleaned.text) if cleaned.text else None
    input_issues = cleaned.issues + (found.issues if found else [])
    reports = [_report(source, None, input_issues)] if input_issues else []
    for index, (tune_text, lines) in enumerate(
        zip(found.tunes, found.source_lines, strict=True) if found else []
    ):
        if tune_index is not None and index != tune_index:
            continue
        tune = parse_tune(tune_text)
        issues = [_to_input_line(i, lines) for i in validate_tune(tune)]
        reports.append(_report(source, index, issues, number=tune.number, title=tune.title, line=lines[0]))
    if tune_index is not None and found is not None and not 0 <= tune_index < len(found.tunes):
        message = f"tune_index {tune_index} out of range: the input holds {len(found.tunes)} tune(s)"
        reports.append(_report(source, tune_index, [Issue(ERROR, "tune_index_out_of_range", message)]))
    return reports


def _read(path: str) -> str:
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    return data.decode("utf-8", errors="replace")


def run_check(cfg: AbcCheckConfig) -> list[dict]:
    """CLI entry: print one JSON line per report; exit 1 when any report holds an error."""
    reports: list[dict] = []
    for path in cfg.inputs:
        try:
            text = _read(path)
        except OSError as e:
            reports.append(
                _report(
                    path, None, [Issue(ERROR, "unreadable_input", f"cannot read {path}: {e.strerror or e}")]
                )
            )
            continue
        reports += check_text(text, cfg.limits, cfg.tune_index, source=path)
    for report in reports:
        print(json.dumps(report, ensure_ascii=False))
    sys.stdout.flush()
    if any(not r["ok"] for r in reports):
        raise SystemExit(1)
    return reports
