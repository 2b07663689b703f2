"""Evaluation outputs: results.json, results.md, one per-subject bar chart per MusicTheoryBench mode, and the
config plus a model fingerprint saved beside them so that a result can be reproduced."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatmusician.config import dump_yaml
from chatmusician.eval.config import EvalConfig

_HASHED_WHOLE = (".json", ".model", ".txt", ".yaml")
_EDGE = 1 << 20  # bytes hashed at each end of a weight file (hashing 14 GB whole would take minutes)


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def file_fingerprint(path: Path) -> str:
    """sha256 of a file: whole for small text files, size + first and last MiB for weight files."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if path.suffix in _HASHED_WHOLE or size <= 2 * _EDGE:
            h.update(f.read())
        else:
            h.update(str(size).encode())
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def model_fingerprint(name_or_path: str | None, repo_type: str = "model") -> dict[str, Any]:
    """Which model (or data set) this was: per-file hashes of a local folder or file, or the hub id and its
    resolved revision."""
    if not name_or_path:
        return {}
    path = Path(name_or_path).expanduser()
    if path.exists():
        files = [path] if path.is_file() else [
            p for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]  # fmt: skip
        path = path if path.is_dir() else path.parent
        hashes = {str(p.relative_to(path)): file_fingerprint(p) for p in files}
        combined = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
        return {"path": str(path.absolute()), "sha256": combined, "files": hashes}
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        info = api.dataset_info(name_or_path) if repo_type == "dataset" else api.model_info(name_or_path)
        return {"hub_id": name_or_path, "revision": info.sha}
    except Exception as err:  # noqa: BLE001 - offline: record what is known
        return {"hub_id": name_or_path, "revision": None, "note": f"revision not resolved: {err}"}


def environment() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "ray", "lm_eval", "datasets"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


_SHARES = ("bar_alignment_error", "unit_as_requested", "scale_consistency", "groove_consistency", "empty_beat_rate",
           "distinct_n", "self_similarity", "nearest_train_similarity", "memorised")  # fmt: skip
_VALUES = ("pitch_range", "pitch_class_entropy")


def markdown(out: Mapping[str, Any], figures: Mapping[str, Any] | None = None) -> str:
    """The summary as markdown: the paper's table layout first (with the paper's figures where ``figures``
    has them for this model), then the details, then the music metrics (accuracies and shares in %)."""
    from chatmusician.eval import paper

    lines = [
        f"# Evaluation of `{out.get('model')}`" + (f" + `{out['adapter']}`" if out.get("adapter") else ""),
        "",
    ]
    if "mtb" in out or "mmlu" in out:
        lines += ["## In the paper's layout (PPL; accuracy in %)", "", *paper.table(out, figures), "",
                  "MusicTheoryBench per subject; MMLU the unweighted mean over subjects (OpenCompass's summary). "
                  "Predictions per question, in OpenCompass's layout: `predictions/`.", ""]  # fmt: skip
    if "mtb" in out:
        rows = list(mtb_rows(out["mtb"]))
        subjects = sorted({s for _, r in rows for s in r["subjects"]})
        lines += ["## MusicTheoryBench in detail", "",
                  "| mode | order | accuracy | CI | " + " | ".join(subjects) + " | subject mean | format errors |",
                  "|---" * (6 + len(subjects)) + "|"]  # fmt: skip
        for label, r in rows:
            ci = f"{_pct(r['ci'][0])}–{_pct(r['ci'][1])} ({int(100 * r['ci_level'])} %)"
            subj = " | ".join(_pct(r["subjects"].get(s)) for s in subjects)
            lines.append(f"| {label} | {_pct(r['accuracy'])} | {ci} | {subj} | {_pct(r['subject_mean'])} | "
                         f"{r['format_errors']} |")  # fmt: skip
        changed = [f"{m} {r['safe_format']['questions_changed']}" + ("" if r["safe_format"]["applied"] else " (not applied)")
                   for m, r in out["mtb"].items() if "safe_format" in r]  # fmt: skip
        if changed:
            lines += ["", "Questions whose PPL prompts OpenCompass's `safe_format` changes (`{A}`-style texts in the "
                      "data replaced by option texts, as the original's were): " + ", ".join(changed)]  # fmt: skip
        lines.append("")
    if "mmlu" in out:
        m = out["mmlu"]
        lines += ["## MMLU (OpenCompass `mmlu_ppl_ac766d`, 5 fixed shots, whole-sequence PPL: the paper's)", "",
                  "| subjects | questions | unweighted mean (the paper's) | weighted by size |", "|---|---|---|---|",
                  f"| {len(m['subjects'])} | {sum(m['sizes'].values())} | {_pct(m['unweighted'])} | "
                  f"{_pct(m['weighted'])} |", ""]  # fmt: skip
    if "mmlu_lm_eval" in out and "error" in out["mmlu_lm_eval"]:
        lines += [f"lm-evaluation-harness cross-check failed: {out['mmlu_lm_eval']['error']}", ""]
    elif "mmlu_lm_eval" in out:
        m = out["mmlu_lm_eval"]
        lines += ["### Cross-check: lm-evaluation-harness MMLU (answer-only log-likelihood, no BOS; not the paper's)",
                  "", "| subjects | unweighted mean | weighted by size |", "|---|---|---|",
                  f"| {len(m['subjects'])} | {_pct(m['unweighted'])} | {_pct(m['weighted'])} |", ""]  # fmt: skip
        if "mtb_lm_eval" in m:
            lines += ["lm-eval MusicTheoryBench task (answer-only log-likelihood): "
                      + ", ".join(f"{k} {_pct(v)}" for k, v in m["mtb_lm_eval"].items()), ""]  # fmt: skip
    if "abc_quality" in out:
        q = out["abc_quality"]
        groups = [("all", q["all"]), *q["families"].items()]
        cols = ("parse_success", "syntax_ok", "midi_ok", "key_as_requested", "meter_as_requested",
                "bar_consistency", "has_repeats", "distinct_bar_ratio", "repeated_bigram_share")  # fmt: skip
        lines += [f"## ABC quality ({'constrained' if q['constrained'] else 'free'} decoding)", "",
                  "| family | tunes | " + " | ".join(cols) + " | tokens |", "|---" * (len(cols) + 3) + "|"]  # fmt: skip
        for name, agg in groups:
            vals = " | ".join(_pct(agg.get(c)) for c in cols)
            lines.append(f"| {name} | {agg['tunes']} | {vals} | {agg.get('tokens', 0):.0f} |")
        lines += ["", "### Music metrics (definitions and sources: docs/evaluation.md)", "",
                  "| family | " + " | ".join(_SHARES + _VALUES) + " |", "|---" * (len(_SHARES + _VALUES) + 1) + "|"]  # fmt: skip
        for name, agg in groups:
            vals = [_pct(agg.get(c)) for c in _SHARES] + [_num(agg.get(c)) for c in _VALUES]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def mtb_rows(mtb: Mapping[str, Any]):
    """(``mode | order`` label, summary) per reported MusicTheoryBench row: the original order, then shuffles."""
    for mode, r in mtb.items():
        yield f"{mode} | original (OpenCompass)", r["original"]
        if "shuffled" in r:
            yield f"{mode} | {len(r['shuffled']['shuffle_accuracy'])} shuffles (paper §4.3)", r["shuffled"]


def subject_chart(mode: str, result: Mapping[str, Any], path: Path) -> None:
    """Bar chart of one mode's per-subject accuracy with the overall accuracy and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*result["subjects"], "all"]
    values = [100 * v for v in result["subjects"].values()] + [100 * result["accuracy"]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.2))
    bars = ax.bar(names, values, color=["#4c72b0"] * (len(names) - 1) + ["#dd8452"])
    lo, hi = (100 * x for x in result["ci"])
    if not (math.isnan(lo) or math.isnan(hi)):
        ax.errorbar([len(names) - 1], [values[-1]], yerr=[[values[-1] - lo], [hi - values[-1]]], fmt="none",
                    ecolor="black", capsize=4)  # fmt: skip
    ax.axhline(25, color="grey", linestyle="--", linewidth=1, label="chance (25 %)")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MusicTheoryBench {mode}")  # mode: the row's label
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def csv_files(out: Mapping[str, Any]) -> dict[str, str]:
    """Per-subject and per-family results as CSV (file name -> text), for spreadsheets and plots."""
    from chatmusician.eval.abc_quality import METRICS

    files = {}
    if "mtb" in out:
        rows = [[mode, order, subject, r["subject_counts"][subject], acc]
                for mode, result in out["mtb"].items()
                for order, r in (("original", result["original"]), ("shuffled", result.get("shuffled"))) if r
                for subject, acc in r["subjects"].items()]  # fmt: skip
        files["mtb_subjects.csv"] = _csv(["mode", "order", "subject", "questions", "accuracy"], rows)
    if "mmlu" in out:
        m = out["mmlu"]
        rows = [[s, m["sizes"][s], acc] for s, acc in m["subjects"].items()]
        files["mmlu_subjects.csv"] = _csv(["subject", "questions", "accuracy"], rows)
    if "abc_quality" in out:
        q = out["abc_quality"]
        groups = [("all", q["all"]), *q["families"].items()]
        rows = [[name, agg["tunes"], *[agg.get(m) for m in METRICS]] for name, agg in groups]
        files["abc_quality_families.csv"] = _csv(["family", "tunes", *METRICS], rows)
    return files


def write(cfg: EvalConfig, out: Mapping[str, Any]) -> Path:
    """Write every output file into ``cfg.output_dir`` and return it."""
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    from chatmusician.eval.paper import load_figures

    (root / "results.md").write_text(markdown(out, load_figures(cfg.paper_figures)), encoding="utf-8")
    for name, text in csv_files(out).items():
        (root / name).write_text(text, encoding="utf-8")
    for mode, result in out.get("mtb", {}).items():
        subject_chart(f"{mode}, original order", result["original"], root / f"mtb_{mode}.png")
        if "shuffled" in result:
            subject_chart(f"{mode}, shuffles", result["shuffled"], root / f"mtb_{mode}_shuffled.png")
    (root / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    fingerprint = {
        "model": model_fingerprint(cfg.model),
        "tokenizer": model_fingerprint(cfg.tokenizer) if cfg.tokenizer else None,
        "adapter": model_fingerprint(cfg.adapter) if cfg.adapter else None,
        "data": {
            "mtb": model_fingerprint(cfg.mtb.path, "dataset") if cfg.mtb.enabled else None,
            "mmlu": model_fingerprint(cfg.mmlu.path, "dataset") if cfg.mmlu.enabled else None,
        },  # fmt: skip
        "environment": environment(),
    }
    (root / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2), encoding="utf-8")
    return root
