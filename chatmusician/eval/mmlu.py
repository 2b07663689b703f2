"""The lm-evaluation-harness cross-check: MMLU 5-shot (and an lm-eval twin of MusicTheoryBench), in-process on
the same model object (``HFLM(pretrained=<model or PeftModel>, tokenizer=...)``). The paper's MMLU number is
:mod:`chatmusician.eval.mmlu_ppl` (OpenCompass's ``mmlu_ppl_ac766d``); this one is labelled as lm-eval's.

* Hub id (``cais/mmlu``): lm-eval's own ``mmlu`` group. Local files in the HF schema (``question, subject,
  choices, answer``): one task per subject built with lm-eval's MMLU template (same prompt, description,
  ``first_n`` dev shots) over per-subject files written to a scratch folder.
* Both means are reported: ``weighted`` by subject size (lm-eval's group aggregate) and ``unweighted`` over
  subjects (the shape of OpenCompass's ``mmlu`` summary; the paper's number comes from :mod:`mmlu_ppl`).

Where lm-eval's scoring and OpenCompass's whole-sequence PPL can disagree (for MusicTheoryBench, whose lm-eval
task below reproduces the OpenCompass strings exactly): lm-eval ranks ``log p(" X" | context)``, the answer
tokens only; OpenCompass ranks the mean cross-entropy of the whole sequence. With one shared prefix and a
single answer token, both are the same ranking (the prefix term and the length are common). They part when
(1) an answer letter tokenizes into more or other tokens than its siblings (the lengths and prefixes differ, so
OpenCompass's average moves while lm-eval sums only the answer tokens); (2) the prompt is too long: OpenCompass
drops shots, then cuts the end of the sequence (the letter itself, making all four equal so A wins), while
lm-eval cuts the context from the left and keeps the answer; (3) BOS: OpenCompass scores with the tokenizer's
BOS, lm-eval adds none by default for causal models; (4) ``acc_norm`` divides by the answer's byte length
(equal for single letters, so it matters only for longer answers).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatmusician.eval import mtb
from chatmusician.eval.config import EvalConfig

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
MMLU_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
MTB_TEXT = "{{input}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"


def local_mmlu_tasks(path: str, scratch: Path) -> list[dict[str, Any]]:
    """lm-eval task configs (dicts) for local MMLU files, Hendrycks' CSVs or the cais/mmlu schema (read by
    :func:`mmlu_ppl.load`): lm-eval's MMLU template, one task per subject."""
    from chatmusician.eval import mmlu_ppl

    tasks = []
    for subject, splits in mmlu_ppl.load(path).items():
        files = {}
        for split, rows in splits.items():
            f = scratch / f"{subject}.{split}.jsonl"
            hf = [{"question": r["input"], "subject": subject, "choices": [r[x] for x in mmlu_ppl.LETTERS],
                   "answer": mmlu_ppl.LETTERS.index(r["target"])} for r in rows]  # fmt: skip
            f.write_text("".join(json.dumps(r) + "\n" for r in hf), encoding="utf-8")
            files[split] = str(f)
        tasks.append({
            "task": f"cm_mmlu_{subject}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": files},
            "test_split": "test",
            "fewshot_split": "dev" if "dev" in files else "test",
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n",
            "doc_to_text": MMLU_TEXT,
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        })  # fmt: skip
    return tasks


def process_mtb_docs(dataset):
    """lm-eval ``process_docs`` of the MusicTheoryBench tasks: the original loader's conversion."""
    return dataset.map(mtb.convert_row, remove_columns=[c for c in dataset.column_names if c in ("options",)])


def mtb_task(path: str, few_shot: bool) -> dict[str, Any]:
    """The lm-eval MusicTheoryBench task as a dict (the shipped YAML's twin, with the data source filled in).

    Strings: description ``{HINT}\\n``, shots ``{input}…Answer: {gold}`` joined by ``\\n\\n``, candidate
    ``" X"`` after ``Answer:``: concatenated, exactly the OpenCompass sequences."""
    local = Path(path)
    source: dict[str, Any] = {"dataset_path": path}
    if local.exists():
        files = {s: [str(p) for p in sorted(local.rglob(f"*{s}*")) if p.is_file()] for s in ("dev", "test")}
        source = {"dataset_path": "json", "dataset_kwargs": {"data_files": files}}
    return {
        "task": f"musictheorybench_{'few' if few_shot else 'zero'}_shot",
        **source,
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": 5 if few_shot else 0,
        "process_docs": process_mtb_docs,
        "output_type": "multiple_choice",
        "description": f"{mtb.HINT}\n",
        "doc_to_text": MTB_TEXT,
        "doc_to_choice": list(mtb.LETTERS),
        "doc_to_target": "{{['A', 'B', 'C', 'D'].index(target)}}",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def summarize(results: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Per-subject accuracy and both means from an lm-eval results dict (tasks named ``{prefix}{subject}``)."""
    subjects, sizes = {}, {}
    for task, metrics in results["results"].items():
        if task.startswith(prefix) and "acc,none" in metrics and task in results.get("n-samples", {}):
            name = task[len(prefix) :]
            subjects[name] = float(metrics["acc,none"])
            sizes[name] = int(results["n-samples"][task]["effective"])
    total = sum(sizes.values())
    return {
        "subjects": dict(sorted(subjects.items())),
        "sizes": dict(sorted(sizes.items())),
        "weighted": sum(subjects[s] * sizes[s] for s in subjects) / total if total else float("nan"),
        "unweighted": sum(subjects.values()) / len(subjects) if subjects else float("nan"),
    }


def evaluate_model(
    model, tokenizer, cfg: EvalConfig, log_samples: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our summary, lm-eval's raw output) for MMLU (+ the MTB twin) on an already loaded model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.mmlu.batch_size, device=device)
    common = {"limit": cfg.mmlu.limit, "log_samples": log_samples, "bootstrap_iters": 0,
              "fewshot_random_seed": cfg.mtb.seed}  # fmt: skip
    hub = not Path(cfg.mmlu.path).exists()
    with tempfile.TemporaryDirectory(prefix="cm-mmlu-") as scratch:
        tasks: list[Any] = ["mmlu"] if hub else local_mmlu_tasks(cfg.mmlu.path, Path(scratch))
        raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=cfg.mmlu.num_fewshot, **common)
    summary = summarize(raw, "mmlu_" if hub else "cm_mmlu_")
    raws = {"mmlu": raw}
    if cfg.mmlu.lm_eval_mtb:  # its own call: each MTB task carries its own shot count
        tasks = [mtb_task(cfg.mtb.path, False), mtb_task(cfg.mtb.path, True)]
        raws["mtb"] = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=None, **common)
        summary["mtb_lm_eval"] = {
            t: float(raws["mtb"]["results"][t]["acc,none"])
            for t in ("musictheorybench_zero_shot", "musictheorybench_few_shot")
        }
    return summary, raws


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Load the model (the replica loader) and run lm-eval on it in this process."""
    from chatmusician.eval.replica import load_for_eval

    model, tokenizer = load_for_eval(cfg, cfg.pool.torch_threads)
    summary, _ = evaluate_model(model, tokenizer, cfg)
    return summary


def run_remote(cfg: EvalConfig) -> dict[str, Any]:
    """:func:`run` as one Ray task with a replica's resources (the model loads where the GPU is)."""
    import ray

    task = ray.remote(num_cpus=cfg.pool.num_cpus, num_gpus=cfg.pool.num_gpus)(run)
    return ray.get(task.remote(cfg))
