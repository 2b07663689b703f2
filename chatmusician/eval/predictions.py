"""Per-question prediction files in OpenCompass's layout, so that a run can be diffed against the original's.

OpenCompass's ``PPLInferencerOutputHandler`` writes, per dataset, ``{"0": {...}, "1": {...}}`` keyed by the
question's index in that dataset, each with ``in-context examples`` (the shots before any was dropped),
``origin_prompt``, one ``label: X`` entry per candidate (``testing input``: the prompt without the shots,
``prompt``, ``PPL``), ``prediction`` and ``gold``. Generation mode (``GenInferencerOutputHandler``):
``origin_prompt``, ``prediction`` (the raw answer) and ``gold``. Files go to ``predictions/<bench>/<subject>.json``
beside results.json (the original's datasets were one per subject).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chatmusician.eval import mtb


def ppl_record(
    prompts: Sequence[str], scores: Sequence[float | None], full_ice: str, kept_ice: Sequence[str],
    labels: Sequence[str], pred: str, gold: str,
) -> dict[str, Any]:  # fmt: skip
    """One question as OpenCompass's PPL inferencer saves it (``kept_ice``: the shots text in force for each
    label, which it removes from the prompt to give the ``testing input``)."""
    record: dict[str, Any] = {"in-context examples": full_ice}
    for label, prompt, score, ice in zip(labels, prompts, scores, kept_ice, strict=True):
        testing = prompt.replace(ice, "")
        record.setdefault("origin_prompt", testing)
        record[f"label: {label}"] = {"testing input": testing, "prompt": prompt, "PPL": score}
    return record | {"prediction": pred, "gold": gold}


def mtb_files(
    cfg, test: Sequence[Mapping[str, Any]], dev: Sequence[Mapping[str, Any]], results: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """``{relative path: file content}`` for every MusicTheoryBench mode, original option order."""
    from chatmusician.eval.generation import chat_prompts

    by_id = {q["id"]: q for q in test}
    files: dict[str, dict[str, Any]] = {}
    for mode, result in results.items():
        few = mode.endswith("few_shot")
        shots = list(dev[: cfg.mtb.shots]) if few else []
        literal = cfg.mtb.safe_format
        per_subject: dict[str, dict[str, Any]] = defaultdict(dict)
        for r in (r for r in result["answers_detail"] if r["shuffle"] < 0):
            q = by_id[r["id"]]
            table = per_subject[q["subject"]]
            if mode.startswith("ppl"):
                kept = r["shots_kept"]
                ice = [mtb.shots_text(shots[:k], literal) if few else "" for k in kept]
                prompts = [
                    mtb.candidate_text(q, x, shots[:k], few, literal)
                    for x, k in zip(mtb.LETTERS, kept, strict=True)
                ]
                full = mtb.shots_text(shots, literal) if few else ""
                table[str(len(table))] = ppl_record(prompts, r["scores"], full, ice, mtb.LETTERS, r["pred"],
                                                    r["target"])  # fmt: skip
            else:
                history = [tuple(t) for t in mtb.chat_history(shots)]
                prompt = chat_prompts([mtb.chat_question(q)], [history])[0]
                table[str(len(table))] = {
                    "origin_prompt": prompt,
                    "prediction": r["text"],
                    "gold": r["target"],
                }
        for subject, table in per_subject.items():
            files[f"predictions/mtb_{mode}/{subject}.json"] = table
    return files


def mmlu_files(
    cfg, data: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], results: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """``{relative path: file content}``: one OpenCompass PPL predictions file per MMLU subject."""
    from chatmusician.eval import mmlu_ppl

    files: dict[str, dict[str, Any]] = defaultdict(dict)
    literal = cfg.mmlu.safe_format
    for r in results["answers_detail"]:
        subject = r["subject"]
        q = data[subject]["test"][r["index"]]
        shots = list(data[subject].get("dev", []))[: cfg.mmlu.num_fewshot]
        tmpl = mmlu_ppl.templates(subject)
        kept = r["shots_kept"]
        ice = [
            mmlu_ppl.opencompass.generate_ice(shots[:k], mmlu_ppl.ICE_TEMPLATES, literal=literal)
            for k in kept
        ]
        prompts = [
            mmlu_ppl.opencompass.label_prompt(tmpl[x], i, q, literal)
            for x, i in zip(mmlu_ppl.LETTERS, ice, strict=True)
        ]
        full = mmlu_ppl.opencompass.generate_ice(shots, mmlu_ppl.ICE_TEMPLATES, literal=literal)
        files[f"predictions/mmlu/{subject}.json"][str(r["index"])] = ppl_record(
            prompts, r["scores"], full, ice, mmlu_ppl.LETTERS, r["pred"], r["target"]
        )
    return dict(files)


def write(root: Path, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Write each file (OpenCompass's ``dump_results_dict``: JSON, indent 4, non-ASCII kept)."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=4, ensure_ascii=False), encoding="utf-8")
