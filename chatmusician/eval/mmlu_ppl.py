"""MMLU as the paper scored it: OpenCompass's ``mmlu_ppl_ac766d`` (what ``eval_chat_musician_7b.py`` ran through
``collections/base_medium_llama``), scored by the project's whole-sequence PPL scorer.

The config, per subject ``name``:

* hint ``The following are multiple choice questions (with answers) about  {name with spaces}.\\n\\n`` (two
  spaces before the subject, as written);
* prompt ``{hint}</E>{input}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: X`` for X in A..D;
* shots ``{input}\\nA. …\\nD. {D}\\nAnswer: {gold}\\n``, the first five dev rows (``FixKRetriever``,
  ``fix_id_list=[0, 1, 2, 3, 4]``), joined by ``"\\n"`` and followed by ``"\\n"``;
* ``PPLInferencer`` with the model's ``max_seq_len`` (2048): shots dropped from the end while a prompt is too
  long; the lowest mean cross-entropy (BOS included) wins, the first on ties.

Data: Hendrycks' CSV layout (``{dev,test}/{name}_{split}.csv``, no header, ``question, A, B, C, D, answer``:
what OpenCompass's ``MMLUDataset`` reads), or the ``cais/mmlu`` schema (``question, subject, choices,
answer``; hub id or local json/jsonl/parquet), converted as OpenCompass's ModelScope branch converts it.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from chatmusician.eval import opencompass

LETTERS = ("A", "B", "C", "D")
_QUESTION = "{input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer: "
ICE_TEMPLATES = {x: f"{_QUESTION}{x}\n" for x in LETTERS}
"""``mmlu_ppl_ac766d``'s ice template (a shot answered with its gold label)."""


class MMLUError(ValueError):
    """An MMLU source that cannot be read (no test split, a malformed row)."""


def hint(subject: str) -> str:
    """The config's description line; two spaces before the subject, as in the original."""
    return (
        f"The following are multiple choice questions (with answers) about  {subject.replace('_', ' ')}.\n\n"
    )


def templates(subject: str) -> dict[str, str]:
    """``mmlu_ppl_ac766d``'s prompt template of one subject (label -> template)."""
    return {x: f"{hint(subject)}{opencompass.ICE_TOKEN}{_QUESTION}{x}" for x in LETTERS}


def candidates(
    subject: str,
    question: Mapping[str, Any],
    shots: Sequence[Mapping[str, Any]],
    token_len: Callable[[str], int] | None = None,
    max_seq_len: int | None = None,
    literal: bool = True,
) -> tuple[list[str], list[int], str]:
    """(the four prompts, the shots each kept, the full in-context text) of one test question."""
    return opencompass.ppl_prompts(
        question, shots, templates(subject), ICE_TEMPLATES, token_len, max_seq_len, literal
    )


# --- data ----------------------------------------------------------------------------------------------------


def from_hf(row: Mapping[str, Any]) -> dict[str, str]:
    """A ``cais/mmlu`` row as OpenCompass's MMLU row (``input, A, B, C, D, target``)."""
    choices = list(row["choices"])
    if len(choices) != 4 or int(row["answer"]) not in range(4):
        raise MMLUError(f"MMLU row {str(row.get('question'))[:40]!r}: needs 4 choices and an answer 0-3")
    return {"input": str(row["question"]), **dict(zip(LETTERS, map(str, choices), strict=True)),
            "target": LETTERS[int(row["answer"])]}  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    """One Hendrycks CSV as OpenCompass's ``MMLUDataset`` reads it (``csv.reader``, six columns)."""
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if len(row) != 6:
                raise MMLUError(f"{path}: a row with {len(row)} columns, not 6")
            rows.append({"input": row[0], **dict(zip(LETTERS, row[1:5], strict=True)), "target": row[5]})
    return rows


def subject_rows(path: str) -> dict[str, dict[str, list[dict]]]:
    """subject -> split -> rows, from local MMLU files (a folder's files are split by dev/test/validation)."""
    import datasets

    local = Path(path)
    files = (
        [local]
        if local.is_file()
        else sorted(p for p in local.rglob("*") if p.suffix in {".json", ".jsonl", ".parquet"})
    )
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for f in files:
        split = next(
            (s for s in ("dev", "validation", "test") if re.search(rf"(^|[_.-]){s}([_.-]|$)", f.name)), "test"
        )
        ds = datasets.load_dataset("parquet" if f.suffix == ".parquet" else "json", data_files=str(f))[
            "train"
        ]
        for row in ds:
            out[row["subject"]][split].append(dict(row))
    return out


def _csv_subjects(root: Path) -> dict[str, dict[str, list[dict[str, str]]]]:
    out: dict[str, dict[str, list[dict[str, str]]]] = defaultdict(dict)
    for f in sorted(root.rglob("*.csv")):
        m = re.fullmatch(r"(.+)_(dev|test|val)\.csv", f.name)
        if m:
            out[m[1]][m[2]] = read_csv(f)
    return out


def load(path: str) -> dict[str, dict[str, list[dict[str, str]]]]:
    """``{subject: {"dev": rows, "test": rows}}`` from Hendrycks' CSVs, local ``cais/mmlu``-schema files or the
    hub id (``cais/mmlu``, config ``all``)."""
    local = Path(path).expanduser()
    if local.is_dir() and any(local.rglob("*_test.csv")):
        subjects = _csv_subjects(local)
    elif local.exists():
        subjects = {s: {split: [from_hf(r) for r in rows] for split, rows in splits.items()}
                    for s, splits in subject_rows(path).items()}  # fmt: skip
    else:
        import datasets

        try:
            loaded = datasets.load_dataset(path, "all")
        except Exception as err:  # offline / unknown id: a clear message, not a traceback
            raise MMLUError(f"cannot load MMLU from {path!r}: {err}") from None
        subjects = defaultdict(dict)
        for split in ("dev", "test"):
            for row in loaded[split]:
                subjects[row["subject"]].setdefault(split, []).append(from_hf(row))
    subjects = {s: splits for s, splits in sorted(subjects.items()) if splits.get("test")}
    if not subjects:
        raise MMLUError(f"{path}: no MMLU test split found")
    return subjects


# --- summaries -----------------------------------------------------------------------------------------------


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-subject accuracy, ``unweighted`` (the mean over subjects: OpenCompass's ``mmlu`` summary, the paper's)
    and ``weighted`` (over questions, as lm-eval's group aggregate) from ``{subject, pred, target}`` records."""
    by_subject: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(float(r["pred"] == r["target"]))
    subjects = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    sizes = {s: len(v) for s, v in sorted(by_subject.items())}
    total = sum(sizes.values())
    return {
        "subjects": subjects,
        "sizes": sizes,
        "unweighted": sum(subjects.values()) / len(subjects) if subjects else float("nan"),
        "weighted": sum(subjects[s] * sizes[s] for s in subjects) / total if total else float("nan"),
    }
