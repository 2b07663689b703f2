"""MusicTheoryBench as the original evaluated it: rows, prompts, option shuffles, answer extraction, summaries.

Pure functions (no torch, no Ray). The strings are the original's OpenCompass configs
(``eval/configs/datasets/music_theory_bench/*_ppl_*.py`` and ``eval/opencompass/datasets/music_theory_bench.py``
in hf-lin/ChatMusician):

* loader: when ``abc_score`` is set, ``Use the example below to answer the question that follows.`` is removed
  from the stem, the stem stripped, and ``"\\n" + abc_score`` appended;
* zero-shot candidate ``X``: ``{HINT}\\n{input}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: X``;
* few-shot: the five dev rows, each ``{input}\\nA. …\\nD. {D}\\nAnswer: {gold}\\n``, joined with ``\\n`` and
  followed by ``\\n`` (OpenCompass's retriever separator and end token), between the hint line and the question;
* truncation (OpenCompass's PPL inferencer): while the prompt has more than ``max_seq_len`` tokens and shots are
  left, drop the last shot (per candidate in A..D order, carried over to the next candidate); the scorer then
  keeps the first ``max_seq_len`` tokens.

The lowest perplexity wins, the first candidate on ties. Templates are filled as OpenCompass fills them
(:mod:`chatmusician.eval.opencompass`): ``safe_format`` over every column of the row, in the order the original
loader leaves them (``dataset.map(convert_dataset)``: the hub's ``id, instruction, stem, options, subject,
answer, split, abc_score, analysis``, then ``input, A, B, C, D, target``), also inside
inserted text, so an ABC grace note ``{A}`` becomes option A's text as it did in the original's prompts
(``literal=False`` fills each field once instead); a few-shot prompt whose every shot was dropped keeps
OpenCompass's ``"\n"`` in their place.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from chatmusician.eval import opencompass

LETTERS = ("A", "B", "C", "D")
HINT = (
    "Read the following questions from the four options (A, B, C and D) given in each question. "
    "Choose the best option."
)
ABC_SENTENCE = "Use the example below to answer the question that follows."
ANSWER_CUE = "\nAnswer: "
FIELDS = ("id", "instruction", "stem", "options", "subject", "answer", "abc_score", "analysis")
_QUESTION = "{input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer: "
TEMPLATES = {x: f"{HINT}\n{opencompass.ICE_TOKEN}{_QUESTION}{x}" for x in LETTERS}
"""The original's ``prompt_template`` (label -> template; ``</E>`` marks where the shots go)."""
ICE_TEMPLATES = {x: f"{_QUESTION}{x}\n" for x in LETTERS}
"""The original's ``ice_template`` (a shot answered with its gold label)."""


class MTBError(ValueError):
    """A MusicTheoryBench row or source that cannot be used (missing field, bad answer, no split)."""


# --- rows ----------------------------------------------------------------------------------------------------


def convert_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Dataset-card row -> the question the prompts use (``input``, ``A``..``D``, ``target``, ``id``, ``subject``)."""
    try:
        stem = str(row["stem"])
        options = row["options"]
        answer = str(row["answer"]).strip()
        opts = {letter: str(options[letter]) for letter in LETTERS}
    except (KeyError, TypeError) as missing:
        raise MTBError(f"MusicTheoryBench row {row.get('id', '?')!r}: missing field {missing}") from None
    if answer not in LETTERS:
        raise MTBError(f"MusicTheoryBench row {row.get('id', '?')!r}: answer {answer!r} is not one of A-D")
    abc = row.get("abc_score")
    if abc:
        stem = f"{stem.replace(ABC_SENTENCE, '').strip()}\n{abc}"
    columns = dict(row)  # every column in the row's order: what OpenCompass's safe_format also replaces
    return {"id": str(row.get("id", "")), "subject": str(row.get("subject", "")), "input": stem, **opts,
            "target": answer, "columns": columns}  # fmt: skip


def _split_files(path: Path, split: str) -> list[str]:
    token = re.compile(rf"(^|[/_.-]){split}([/_.-]|$)")
    return sorted(str(p) for p in path.rglob("*") if p.is_file() and token.search(p.name))


def load_rows(path: str) -> dict[str, list[dict[str, Any]]]:
    """``{"dev": [...], "test": [...]}`` raw rows from a hub id or a local folder/file (parquet, json, jsonl).

    One code path: ``datasets.load_dataset`` (the original's loader) for the hub, its json/parquet builders for
    local files (a folder's files are assigned to splits by ``dev``/``test`` in their names)."""
    import datasets

    local = Path(path).expanduser()
    if local.exists():
        files = [local] if local.is_file() else None
        data_files = (
            {"test": [str(local)]}
            if files
            else {s: f for s in ("dev", "test") if (f := _split_files(local, s))}
        )
        if not data_files.get("test"):
            raise MTBError(f"{path}: no test split found (files named *test*.parquet|json|jsonl)")
        suffix = Path(data_files["test"][0]).suffix
        builder = "parquet" if suffix == ".parquet" else "json"
        loaded = datasets.load_dataset(builder, data_files=data_files)
    else:
        try:
            loaded = datasets.load_dataset(path)
        except Exception as err:  # offline / unknown id: a clear message, not a traceback
            raise MTBError(f"cannot load MusicTheoryBench from {path!r}: {err}") from None
    return {split: [dict(r) for r in loaded[split]] for split in ("dev", "test") if split in loaded}


def load_questions(
    path: str, subjects: Sequence[str] = ("knowledge", "reasoning"), limit: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(dev shots, test questions of the chosen subjects), converted; ``limit`` keeps the first N test rows."""
    rows = load_rows(path)
    dev = [convert_row(r) for r in rows.get("dev", [])]
    test = [convert_row(r) for r in rows["test"] if r.get("subject") in set(subjects)]
    return dev, test[:limit] if limit is not None else test


# --- prompts -------------------------------------------------------------------------------------------------


def question_block(q: Mapping[str, Any]) -> str:
    """``{input}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: `` (the candidate letter follows)."""
    return f"{q['input']}\nA. {q['A']}\nB. {q['B']}\nC. {q['C']}\nD. {q['D']}{ANSWER_CUE}"


def entry(q: Mapping[str, Any]) -> dict[str, Any]:
    """The row as OpenCompass's template sees it: the dataset columns, then ``input, A..D, target``."""
    return {**q.get("columns", {}), **{k: q[k] for k in ("input", *LETTERS, "target")}}


def shots_text(shots: Sequence[Mapping[str, Any]], literal: bool = True) -> str:
    """In-context examples as OpenCompass's retriever joins them (separator ``\\n``, end token ``\\n``)."""
    return opencompass.generate_ice([entry(s) for s in shots], ICE_TEMPLATES, literal=literal)


def candidate_text(
    q: Mapping[str, Any],
    letter: str,
    shots: Sequence[Mapping[str, Any]] = (),
    few_shot: bool | None = None,
    literal: bool = True,
) -> str:
    """The full sequence scored for one candidate letter; ``few_shot`` defaults to whether shots are given (a
    few-shot prompt with no shot left has ``"\\n"`` where they were, as OpenCompass's retriever gives)."""
    few = bool(shots) if few_shot is None else few_shot
    ice = shots_text(shots, literal) if few else ""
    return opencompass.label_prompt(TEMPLATES[letter], ice, entry(q), literal)


def candidate_texts(
    q: Mapping[str, Any],
    shots: Sequence[Mapping[str, Any]] = (),
    token_len: Callable[[str], int] | None = None,
    max_seq_len: int | None = None,
    few_shot: bool | None = None,
    literal: bool = True,
) -> list[str]:
    """The four candidates with OpenCompass's shot-dropping rule applied (``token_len`` counts tokens the way
    the model's tokenizer does, BOS included when it adds one)."""
    return candidates(q, shots, token_len, max_seq_len, few_shot, literal)[0]


def candidates(
    q: Mapping[str, Any],
    shots: Sequence[Mapping[str, Any]] = (),
    token_len: Callable[[str], int] | None = None,
    max_seq_len: int | None = None,
    few_shot: bool | None = None,
    literal: bool = True,
) -> tuple[list[str], list[int], str]:
    """(the four candidates, the shots each kept, the full in-context text) as ``PPLInferencer`` builds them."""
    few = bool(shots) if few_shot is None else few_shot
    return opencompass.ppl_prompts(
        entry(q), [entry(s) for s in shots], TEMPLATES, ICE_TEMPLATES if few else None, token_len,
        max_seq_len, literal,
    )  # fmt: skip


def safe_format_changes(
    q: Mapping[str, Any], shots: Sequence[Mapping[str, Any]] = (), few_shot: bool = False
) -> bool:
    """Whether OpenCompass's ``safe_format`` gives this question (with all its shots) other prompts than
    filling each field once: the questions whose original prompts held replaced ``{A}``-style texts."""
    return any(
        candidate_text(q, x, shots, few_shot, True) != candidate_text(q, x, shots, few_shot, False)
        for x in LETTERS
    )


def chat_question(q: Mapping[str, Any]) -> str:
    """The user message of generation mode: the hint and the question with its options (the assistant's turn
    gives the answer, so no ``Answer:`` cue)."""
    return f"{HINT}\n{question_block(q).removesuffix(ANSWER_CUE)}"


def chat_history(shots: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Few-shot generation mode: each dev row as an earlier turn answered ``Answer: {gold}``."""
    return [(chat_question(s), f"Answer: {s['target']}") for s in shots]


# --- option shuffles -----------------------------------------------------------------------------------------


def permutation(question_id: str, shuffle: int, seed: int) -> list[int]:
    """Seeded permutation of the four options for one (question, shuffle): the same whatever the run's order.
    ``perm[i]`` is the original index of the option shown at position i; shuffle -1 is the identity."""
    if shuffle < 0:
        return [0, 1, 2, 3]
    import numpy as np

    rng = np.random.default_rng([seed, shuffle, zlib.crc32(question_id.encode())])
    return [int(i) for i in rng.permutation(4)]


def shuffle_question(q: Mapping[str, Any], perm: Sequence[int]) -> dict[str, Any]:
    """The question with its options reordered by ``perm`` and the gold letter moved with its option."""
    out = dict(q)
    for pos, orig in enumerate(perm):
        out[LETTERS[pos]] = q[LETTERS[orig]]
    out["target"] = LETTERS[list(perm).index(LETTERS.index(q["target"]))]
    return out


def shuffle_ids(shuffles: int) -> list[int]:
    """Shuffle indices of a run: ``-1`` (the original order, what the released OpenCompass configs score) always,
    then ``0..shuffles-1`` (the seeded orders the paper averages, §4.3)."""
    return [-1, *range(shuffles)]


# --- generation-mode answers ---------------------------------------------------------------------------------


def extract_letter(text: str) -> str | None:
    """The option letter a free-text answer chose as OpenCompass reads it (``first_option_postprocess`` over
    ``ABCD``), or None (a format error)."""
    return opencompass.first_option_postprocess(text, "".join(LETTERS)) or None


# --- summaries -----------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], level: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (per-question accuracies)."""
    if not values or resamples <= 0:
        return (math.nan, math.nan)
    import numpy as np

    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def summarize(
    records: Iterable[Mapping[str, Any]], ci_level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy of one mode from per-(question, shuffle) records ``{id, subject, shuffle, pred, target}``.

    A question's accuracy is its mean over shuffles; ``accuracy`` is the mean over questions (= the mean of
    the per-shuffle accuracies), ``subject_mean`` the unweighted mean of the subjects (OpenCompass's summary
    style), ``ci`` a bootstrap interval over questions, ``format_errors`` the answers with no letter
    (generation mode), counted apart from wrong answers."""
    records = list(records)
    per_question: dict[str, list[float]] = defaultdict(list)
    subject_of: dict[str, str] = {}
    per_shuffle: dict[int, list[float]] = defaultdict(list)
    format_errors = wrong = 0
    for r in records:
        correct = float(r["pred"] == r["target"])
        per_question[r["id"]].append(correct)
        subject_of[r["id"]] = r["subject"]
        per_shuffle[int(r["shuffle"])].append(correct)
        if r["pred"] is None:
            format_errors += 1
        elif not correct:
            wrong += 1
    q_acc = {qid: sum(v) / len(v) for qid, v in per_question.items()}
    by_subject: dict[str, list[float]] = defaultdict(list)
    for qid, acc in q_acc.items():
        by_subject[subject_of[qid]].append(acc)
    subjects = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    shuffle_acc = [sum(v) / len(v) for _, v in sorted(per_shuffle.items())]
    mean = sum(q_acc.values()) / len(q_acc) if q_acc else math.nan
    std = (
        math.sqrt(sum((a - mean) ** 2 for a in shuffle_acc) / (len(shuffle_acc) - 1))
        if len(shuffle_acc) > 1
        else 0.0
    )
    return {
        "accuracy": mean,
        "ci": list(bootstrap_ci(list(q_acc.values()), ci_level, resamples, seed)),
        "ci_level": ci_level,
        "subjects": subjects,
        "subject_counts": {s: len(v) for s, v in sorted(by_subject.items())},
        "subject_mean": sum(subjects.values()) / len(subjects) if subjects else math.nan,
        "shuffle_accuracy": shuffle_acc,
        "shuffle_std": std,
        "questions": len(q_acc),
        "answers": len(records),
        "format_errors": format_errors,
        "wrong": wrong,
    }
