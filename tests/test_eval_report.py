"""results.md leads with the paper's table layout (this run's original order, its shuffle mean, the paper's
figures where given), then the details and the music metrics."""

from __future__ import annotations

import yaml

from chatmusician.eval import mmlu_ppl, mtb, paper, report
from chatmusician.eval.config import PAPER_FIGURES


def records(accuracy: dict[str, float], shuffles=(-1,)) -> list[dict]:
    """Ten questions per subject, the first ``accuracy * 10`` answered right, in every shuffle."""
    out = []
    for subject, acc in accuracy.items():
        for i in range(10):
            for k in shuffles:
                pred = "A" if i < round(10 * acc) else "B"
                out.append(
                    {"id": f"{subject}-{i}", "subject": subject, "shuffle": k, "pred": pred, "target": "A"}
                )
    return out


def mode(original: dict[str, float], shuffled: dict[str, float] | None = None) -> dict:
    r = {"original": mtb.summarize(records(original), resamples=0), "safe_format": {"applied": True,
         "questions_changed": 1}}  # fmt: skip
    if shuffled:
        r["shuffled"] = mtb.summarize(records(shuffled, range(5)), resamples=0)
    return r


def run_out(model="./models/ChatMusician") -> dict:
    mmlu_recs = [
        {"subject": "anatomy", "pred": "A", "target": "A"},
        {"subject": "law", "pred": "B", "target": "A"},
    ]
    return {
        "model": model,
        "mtb": {
            "ppl_zero_shot": mode({"knowledge": 0.5, "reasoning": 0.3}, {"knowledge": 0.4, "reasoning": 0.2}),
            "ppl_few_shot": mode({"knowledge": 0.6, "reasoning": 0.1}, {"knowledge": 0.7, "reasoning": 0.0}),
        },
        "mmlu": mmlu_ppl.summarize(mmlu_recs),
        "abc_quality": {
            "constrained": False,
            "all": {"tunes": 2, "bar_alignment_error": 0.125, "pitch_range": 12.0},
            "families": {},
        },  # fmt: skip
    }


def test_results_md_leads_with_the_papers_layout_and_the_papers_figures_beside(tmp_path):
    figures = {"m-a-p/ChatMusician": {"source": "Table X", "mtb_knowledge_zero_shot": 39.5, "mmlu": 46.8}}
    text = report.markdown(run_out(), figures)
    headers = [line for line in text.splitlines() if line.startswith("## ")]
    assert headers[0] == "## In the paper's layout (PPL; accuracy in %)"
    assert headers.index("## MusicTheoryBench in detail") < headers.index("## ABC quality (free decoding)")
    table = text.split(headers[0])[1].split("## ")[0]
    assert "| | MTB knowledge, zero-shot | MTB reasoning, zero-shot | MTB knowledge, few-shot | " in table
    assert (
        "| this run, original option order (the released OpenCompass configs) | 50.0 | 30.0 | 60.0 | 10.0 | 50.0 |"
        in table
    )
    assert (
        "| this run, mean of 5 option shuffles (the paper's §4.3) | 40.0 | 20.0 | 70.0 | 0.0 | – |" in table
    )
    assert "| paper (Table X) | 39.5 | – | – | – | 46.8 |" in table  # matched by the model's last path part
    assert "| all | 12.5 |" in text and "| 12.00 |" in text  # music metrics: shares in %, pitch range as is


def test_no_paper_row_without_figures_for_the_model_and_the_shipped_file_holds_every_column():
    assert "| paper" not in report.markdown(
        run_out("some/other-model"), {"m-a-p/ChatMusician": {"mmlu": 1.0}}
    )
    shipped = yaml.safe_load(open(PAPER_FIGURES, encoding="utf-8"))
    for entry in shipped.values():
        assert set(paper.COLUMNS) <= set(entry)
    assert "| paper" not in report.markdown(
        run_out(), paper.load_figures(PAPER_FIGURES)
    )  # empty until filled
