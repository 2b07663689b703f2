"""``chatmusician eval``: MusicTheoryBench (PPL + generation), MMLU (OpenCompass PPL; lm-eval as a cross-check)
and ABC quality as Ray Data batch inference over a pool of model replicas.

What it supports: the original's OpenCompass protocol for MusicTheoryBench (zero-/few-shot PPL, one-pass
scoring where tokenization allows), the paper's seeded option shuffles with per-subject accuracy and a
bootstrap interval, generation mode with letter extraction and format errors counted apart, MMLU as the paper
scored it (OpenCompass's ``mmlu_ppl_ac766d`` through the same scorer; lm-eval optional), and ABC quality (parse success through the validator and abc2midi,
key/meter, bar consistency, repeats, structure), optionally through constrained decoding.

Shape: plan work items (pure) -> stream them through ``Replica`` actors (``ray.data.ActorPoolStrategy``: each
actor loads the model once; or one process when ``pool.use_ray`` is false) -> summarize (pure) -> write
``results.json``, ``results.md``, one bar chart per scored mode, ``config.yaml`` and ``fingerprint.json``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from chatmusician.eval import abc_quality, compare, mmlu_ppl, mtb, predictions
from chatmusician.eval.config import MTB_MODES, EvalConfig
from chatmusician.eval.replica import Replica, load_for_eval, process
from chatmusician.terminal import progress_line

# --- planning ------------------------------------------------------------------------------------------------


def check_config(cfg: EvalConfig) -> None:
    """Config mistakes reported before any work starts (one clear ValueError)."""
    bad = [m for m in cfg.mtb.modes if m not in MTB_MODES]
    if bad:
        raise ValueError(f"mtb.modes: unknown {bad}; choose from {list(MTB_MODES)}")
    if cfg.mtb.shuffles < 0 or cfg.abc_quality.n_per_prompt < 1 or cfg.pool.replicas < 1:
        raise ValueError("mtb.shuffles must be >= 0, abc_quality.n_per_prompt and pool.replicas >= 1")
    if cfg.pool.batch_size < 1:
        raise ValueError("pool.batch_size must be >= 1")


def mtb_items(
    dev: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]], modes: Sequence[str], shuffles: int,
    seed: int, shots: int = 5, literal: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """One work item per (mode, shuffle, question); the question carries its shuffled options and gold. Few-shot
    modes take the first ``shots`` dev rows (OpenCompass's ``fix_id_list``)."""
    items = []
    for mode in modes:
        kind = "ppl" if mode.startswith("ppl") else "gen"
        few = mode.endswith("few_shot")
        for shuffle in mtb.shuffle_ids(shuffles):
            for q in test:
                question = mtb.shuffle_question(q, mtb.permutation(q["id"], shuffle, seed))
                payload = {"bench": "mtb", "question": question, "shots": list(dev[:shots]) if few else [],
                           "few_shot": few, "literal": literal}  # fmt: skip
                items.append({"key": json.dumps([mode, shuffle, q["id"]]), "kind": kind,
                              "payload": json.dumps(payload)})  # fmt: skip
    return items


def mmlu_items(
    data: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], shots: int, literal: bool = True,
    limit: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One ``ppl`` work item per MMLU test question (the first ``limit`` of each subject), with its subject's
    first ``shots`` dev rows."""
    items = []
    for subject, splits in data.items():
        dev = list(splits.get("dev", []))[:shots]
        for i, q in enumerate(list(splits["test"])[:limit]):
            payload = {"bench": "mmlu", "subject": subject, "question": q, "shots": dev, "literal": literal}
            items.append(
                {"key": json.dumps(["mmlu", subject, i]), "kind": "ppl", "payload": json.dumps(payload)}
            )
    return items


def item_seed(seed: int, name: str, k: int) -> int:
    """The sampling seed of sample ``k`` of prompt ``name``: its own, whatever the batch it lands in."""
    return zlib.crc32(f"{seed}:{name}:{k}".encode())


def abc_items(prompts: Sequence[Mapping[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    return [
        {
            "key": json.dumps(["abc", p["name"], k]),
            "kind": "abc",
            "payload": json.dumps(
                {
                    "prompt": p["prompt"],
                    "seed": item_seed(seed, p["name"], k),
                    "request": p["request"],
                    "answer_prefix": p.get("answer_prefix", ""),
                }
            ),
        }  # fmt: skip
        for p in prompts
        for k in range(n)
    ]


# --- execution -----------------------------------------------------------------------------------------------


def _threads(cfg: EvalConfig) -> int:
    return cfg.pool.torch_threads or max(1, math.ceil(cfg.pool.num_cpus))


def run_local(cfg: EvalConfig, items: Sequence[Mapping[str, Any]], model=None, tokenizer=None) -> list[dict]:
    """The single-process loop: the same :func:`process` as the actors, batch by batch, with progress."""
    if model is None:
        model, tokenizer = load_for_eval(cfg, _threads(cfg))
    out: list[dict] = []
    step = cfg.pool.batch_size
    for start in range(0, len(items), step):
        out += process(model, tokenizer, items[start : start + step], cfg)
        done = min(start + step, len(items))
        print(progress_line("[eval]", done, len(items), "items"), file=sys.stderr, flush=True)
    return out


def run_ray(cfg: EvalConfig, items: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Ray Data batch inference: items stream through ``pool.replicas`` actors, each holding the model."""
    import ray

    ds = ray.data.from_items(list(items), override_num_blocks=max(1, len(items) // cfg.pool.batch_size))
    ds = ds.map_batches(
        Replica,
        fn_constructor_kwargs={"cfg": cfg, "threads": _threads(cfg)},
        batch_size=cfg.pool.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.pool.replicas),
        num_cpus=cfg.pool.num_cpus,
        num_gpus=cfg.pool.num_gpus,
    )
    return ds.take_all()


def execute(cfg: EvalConfig, items: Sequence[Mapping[str, Any]]) -> list[dict]:
    if not items:
        return []
    return run_ray(cfg, items) if cfg.pool.use_ray else run_local(cfg, items)


# --- summaries -----------------------------------------------------------------------------------------------


def mtb_results(
    cfg: EvalConfig, test: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
    dev: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:  # fmt: skip
    """Per mode: ``original`` (the original option order: the released code's number), ``shuffled`` (the seeded
    orders averaged: the paper's stated method; absent with ``shuffles: 0``), the one-pass share, how many
    questions OpenCompass's ``safe_format`` changes, and every answer."""
    by_id = {q["id"]: q for q in test}
    records: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        mode, shuffle, qid = json.loads(r["key"])
        res = json.loads(r["result"])
        gold = mtb.shuffle_question(by_id[qid], mtb.permutation(qid, shuffle, cfg.mtb.seed))["target"]
        records[mode].append({"id": qid, "subject": by_id[qid]["subject"], "shuffle": shuffle,
                              "target": gold, **res})  # fmt: skip
    out = {}
    args = (cfg.mtb.ci_level, cfg.mtb.bootstrap, cfg.mtb.seed)
    for mode in cfg.mtb.modes:
        recs = sorted(records[mode], key=lambda r: (r["shuffle"], r["id"]))
        few = mode.endswith("few_shot")
        shots = list(dev[: cfg.mtb.shots]) if few else []
        summary: dict[str, Any] = {"original": mtb.summarize([r for r in recs if r["shuffle"] < 0], *args)}
        if cfg.mtb.shuffles:
            summary["shuffled"] = mtb.summarize([r for r in recs if r["shuffle"] >= 0], *args)
        if mode.startswith("ppl"):
            summary["one_pass_share"] = sum(r.get("method") == "one_pass" for r in recs) / max(1, len(recs))
        if mode.startswith(
            "ppl"
        ):  # generation mode fills the chat template itself: no OpenCompass config to follow
            changed = sum(mtb.safe_format_changes(q, shots, few) for q in test)
            summary["safe_format"] = {"applied": cfg.mtb.safe_format, "questions_changed": changed}
        summary["answers_detail"] = recs
        out[mode] = summary
    return out


def mmlu_results(
    cfg: EvalConfig, data: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    results: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """Per-subject accuracy and both means (:func:`mmlu_ppl.summarize`), the one-pass share, the questions
    ``safe_format`` changes, and every answer (``index``: the question's place in its subject's test split)."""
    recs = []
    for r in results:
        _, subject, i = json.loads(r["key"])
        gold = data[subject]["test"][i]["target"]
        recs.append({"subject": subject, "index": i, "target": gold, **json.loads(r["result"])})
    recs.sort(key=lambda r: (r["subject"], r["index"]))
    changed = 0
    for subject, splits in data.items():
        dev = list(splits.get("dev", []))[: cfg.mmlu.num_fewshot]
        for q in list(splits["test"])[: cfg.mmlu.limit]:
            texts = [mmlu_ppl.candidates(subject, q, dev, literal=flag)[0] for flag in (True, False)]
            changed += texts[0] != texts[1]
    return {
        "protocol": "OpenCompass mmlu_ppl_ac766d (the paper's)",
        **mmlu_ppl.summarize(recs),
        "one_pass_share": sum(r.get("method") == "one_pass" for r in recs) / max(1, len(recs)),
        "safe_format": {"applied": cfg.mmlu.safe_format, "questions_changed": changed},
        "answers_detail": recs,
    }


def abc_results(
    cfg: EvalConfig, prompts: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    by_name = {p["name"]: p for p in prompts}
    rows = []
    for r in sorted(results, key=lambda r: r["key"]):
        _, name, k = json.loads(r["key"])
        res = json.loads(r["result"])
        p = by_name[name]
        midi_ok = abc_quality.midi_check(res["text"]) if cfg.abc_quality.check_midi else None
        metrics = abc_quality.tune_metrics(res["text"], p["request"], midi_ok)
        rows.append({"name": name, "family": p["family"], "sample": k, "tokens": res["tokens"],
                     "text": res["text"], **metrics})  # fmt: skip
    abc_quality.diversity(rows, cfg.abc_quality.distinct_n)
    if cfg.abc_quality.train_tunes:
        abc_quality.memorisation(rows, abc_quality.load_train_tunes(cfg.abc_quality.train_tunes))
    for r in rows:  # what they were computed from, not results
        for key in ("body", "music_tokens"):
            r.pop(key, None)
    return {**abc_quality.summarize(rows), "constrained": cfg.abc_quality.constrained, "tunes_detail": rows}


# --- entry ---------------------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every enabled evaluation (Ray must already be initialized when ``pool.use_ray``); write outputs."""
    from chatmusician.eval import report

    check_config(cfg)
    start = time.perf_counter()
    items: list[dict] = []
    dev: list[dict] = []
    test: list[dict] = []
    prompts: list[dict] = []
    if cfg.mtb.enabled:
        dev, test = mtb.load_questions(cfg.mtb.path, cfg.mtb.subjects, cfg.mtb.limit)
        if any(m.endswith("few_shot") for m in cfg.mtb.modes) and not dev:
            raise ValueError(f"{cfg.mtb.path}: few-shot modes need the dev split")
        items += mtb_items(dev, test, cfg.mtb.modes, cfg.mtb.shuffles, cfg.mtb.seed, cfg.mtb.shots,
                           cfg.mtb.safe_format)  # fmt: skip
    mmlu_data: dict[str, Any] = {}
    if cfg.mmlu.enabled:
        mmlu_data = mmlu_ppl.load(cfg.mmlu.path)
        items += mmlu_items(mmlu_data, cfg.mmlu.num_fewshot, cfg.mmlu.safe_format, cfg.mmlu.limit)
    if cfg.abc_quality.enabled:
        prompts = abc_quality.load_prompts(cfg.abc_quality.prompts)
        items += abc_items(prompts, cfg.abc_quality.n_per_prompt, cfg.mtb.seed)
    print(f"[eval] {len(items)} work items on {cfg.pool.replicas} replica(s)", file=sys.stderr, flush=True)
    results = execute(cfg, items)
    out: dict[str, Any] = {"model": cfg.model, "adapter": cfg.adapter}
    mtb_rows = [r for r in results if r["kind"] != "abc" and json.loads(r["key"])[0] != "mmlu"]
    if cfg.mtb.enabled:
        out["mtb"] = mtb_results(cfg, test, mtb_rows, dev)
    if cfg.abc_quality.enabled:
        out["abc_quality"] = abc_results(cfg, prompts, [r for r in results if r["kind"] == "abc"])
    if cfg.mmlu.enabled:
        out["mmlu"] = mmlu_results(cfg, mmlu_data, [r for r in results if json.loads(r["key"])[0] == "mmlu"])
    if cfg.mmlu.enabled and cfg.mmlu.lm_eval:  # the labelled cross-check: its failure must not lose the rest
        from chatmusician.eval import mmlu

        try:
            out["mmlu_lm_eval"] = mmlu.run_remote(cfg) if cfg.pool.use_ray else mmlu.run(cfg)
        except Exception as err:  # noqa: BLE001 - reported in results.json/results.md and on stderr
            out["mmlu_lm_eval"] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[eval] lm-eval cross-check failed: {err}", file=sys.stderr, flush=True)
    out["wall_s"] = time.perf_counter() - start
    root = report.write(cfg, out)
    if cfg.mtb.enabled:
        predictions.write(root, predictions.mtb_files(cfg, test, dev, out["mtb"]))
    if cfg.mmlu.enabled:
        predictions.write(root, predictions.mmlu_files(cfg, mmlu_data, out["mmlu"]))
    return out


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def model_configs(cfg: EvalConfig) -> list[tuple[str, EvalConfig]]:
    """(name, config) per model: ``cfg`` itself, or one copy per entry of ``models`` writing into its own
    subfolder of ``output_dir``."""
    models = _split(cfg.models)
    if not models:
        return [(cfg.model, cfg)]
    out = []
    for i, model in enumerate(models):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").split("/")[-1]) or "model"
        out.append(
            (
                model,
                replace(cfg, model=model, models=None, output_dir=str(Path(cfg.output_dir) / f"{i}-{slug}")),
            )
        )
    return out


def run(cfg: EvalConfig) -> dict[str, Any]:
    """CLI / ``ray job submit`` entry: join the cluster (``RAY_ADDRESS``) or start a local Ray, evaluate, print
    the summary table, and shut down only what it started."""
    from chatmusician.eval import report

    check_config(cfg)  # before Ray starts
    from contextlib import nullcontext

    from chatmusician.ray_local import ray_session

    runs: dict[str, dict[str, Any]] = {}
    with ray_session() if cfg.pool.use_ray else nullcontext():
        for name, sub in model_configs(cfg):
            runs[name] = out = evaluate(sub)
            print(report.markdown(out))
            print(f"[eval] results in {sub.output_dir}", file=sys.stderr)
    for folder in _split(cfg.compare):
        runs[folder] = compare.load(folder)
    if len(runs) > 1:
        print(f"[eval] comparison in {compare.write(cfg.output_dir, runs)}", file=sys.stderr)
    return out
