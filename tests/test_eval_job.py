"""The evaluation as Ray Data batch inference (replica pool == single-process loop), its output files, MMLU and
the MTB twin through lm-evaluation-harness (``ray job submit`` of ``ray_jobs.evaluate``: tests/test_job_chain.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatmusician.config import load_config
from chatmusician.eval import mtb, runner
from chatmusician.eval.config import MMLU_FIXTURE, MTB_FIXTURE, EvalConfig


def small_config(model: str, out: Path, **pool) -> EvalConfig:
    cfg = EvalConfig(model=model, output_dir=str(out), device="cpu")
    cfg.mtb.modes, cfg.mtb.limit, cfg.mtb.shuffles, cfg.mtb.bootstrap = (
        ["ppl_zero_shot", "gen_zero_shot"],
        4,
        2,
        200,
    )
    cfg.mtb.gen_max_new_tokens = 4
    cfg.abc_quality.enabled, cfg.abc_quality.n_per_prompt, cfg.abc_quality.max_new_tokens = True, 1, 12
    cfg.abc_quality.prompts = str(out.parent / "prompts.json")
    (out.parent / "prompts.json").write_text(
        json.dumps(
            [
                {
                    "name": "jig",
                    "family": "text_to_music",
                    "fields": {"description": {"M": "6/8", "K": "G"}},
                    "request": {"key": "G", "meter": "6/8"},
                }
            ]
        )  # fmt: skip
    )
    cfg.abc_quality.check_midi = False
    for k, v in pool.items():
        setattr(cfg.pool, k, v)
    return cfg


def test_config_mistakes_are_reported_before_any_work():
    cfg = EvalConfig(model="x")
    cfg.mtb.modes = ["ppl_one_shot"]
    with pytest.raises(ValueError, match="unknown \\['ppl_one_shot'\\]"):
        runner.check_config(cfg)
    cfg = EvalConfig(model="x")
    cfg.pool.replicas = 0
    with pytest.raises(ValueError, match="replicas"):
        runner.check_config(cfg)


def original_scores(out, qid):
    return next(
        r["scores"]
        for r in out["mtb"]["ppl_zero_shot"]["answers_detail"]
        if r["id"] == qid and r["shuffle"] < 0
    )


@pytest.mark.integration
def test_ray_data_replica_pool_gives_the_single_process_answers(ray_cluster, tiny_model_path, tmp_path):
    local_cfg = small_config(tiny_model_path, tmp_path / "local", use_ray=False, batch_size=4)
    pool_cfg = small_config(tiny_model_path, tmp_path / "pool", replicas=2, num_cpus=0.5, batch_size=4)
    local = runner.evaluate(local_cfg)
    pooled = runner.evaluate(pool_cfg)
    for mode in ("ppl_zero_shot", "gen_zero_shot"):
        a, b = local["mtb"][mode]["shuffled"], pooled["mtb"][mode]["shuffled"]
        assert a["questions"] == 4 and a["answers"] == 8  # 4 questions x 2 shuffles
        assert local["mtb"][mode]["original"]["answers"] == 4  # and the original order beside them
        details = [local["mtb"][mode]["answers_detail"], pooled["mtb"][mode]["answers_detail"]]
        assert [r["pred"] for r in details[0]] == [r["pred"] for r in details[1]]
        assert a["accuracy"] == b["accuracy"] and a["ci"] == b["ci"]
    for ra, rb in zip(local["mtb"]["ppl_zero_shot"]["answers_detail"], pooled["mtb"]["ppl_zero_shot"]["answers_detail"], strict=True):  # fmt: skip
        assert ra["scores"] == pytest.approx(rb["scores"], abs=1e-5)
    assert pooled["abc_quality"]["all"]["tunes"] == 1
    assert 0 < pooled["abc_quality"]["tunes_detail"][0]["tokens"] <= 12
    # the files a result is reproduced from
    out = tmp_path / "pool"
    saved = json.loads((out / "results.json").read_text())
    original = pooled["mtb"]["ppl_zero_shot"]["original"]
    assert saved["mtb"]["ppl_zero_shot"]["original"]["accuracy"] == original["accuracy"]
    assert "| ppl_zero_shot | original (OpenCompass) |" in (out / "results.md").read_text()
    for mode in ("ppl_zero_shot", "gen_zero_shot"):
        assert (out / f"mtb_{mode}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # OpenCompass's predictions layout, one file per subject, the original order's answers
    preds = json.loads((out / "predictions/mtb_ppl_zero_shot/knowledge.json").read_text())
    assert list(preds) == ["0", "1", "2", "3"]
    first = preds["0"]
    assert first["prediction"] in "ABCD" and first["gold"] == "C"
    assert first["label: B"]["prompt"] == mtb.candidate_text(mtb.load_questions(MTB_FIXTURE)[1][0], "B")
    assert [first[f"label: {x}"]["PPL"] for x in "ABCD"] == original_scores(pooled, "test-0")
    gen = json.loads((out / "predictions/mtb_gen_zero_shot/knowledge.json").read_text())["0"]
    assert set(gen) == {"origin_prompt", "prediction", "gold"}
    assert load_config(EvalConfig, out / "config.yaml") == pool_cfg
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    again = json.loads((tmp_path / "local" / "fingerprint.json").read_text())
    assert fingerprint["model"]["sha256"] == again["model"]["sha256"]
    assert "model.safetensors" in fingerprint["model"]["files"] and fingerprint["environment"]["torch"]


@pytest.mark.integration
def test_mmlu_and_the_mtb_twin_through_lm_eval(tiny_model_path, tmp_path):
    from chatmusician.eval import mmlu, scoring
    from chatmusician.model.loading import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    cfg = EvalConfig(model=tiny_model_path)
    cfg.mmlu.path, cfg.mmlu.lm_eval_mtb, cfg.mtb.path = MMLU_FIXTURE, True, MTB_FIXTURE
    cfg.mmlu.limit = 4  # per task: all of MMLU's fixture, the first 4 MTB questions
    summary, raw = mmlu.evaluate_model(model, tokenizer, cfg, log_samples=True)
    assert summary["sizes"] == {"high_school_mathematics": 4, "world_religions": 3}
    subj = summary["subjects"]
    assert summary["weighted"] == pytest.approx(
        (4 * subj["high_school_mathematics"] + 3 * subj["world_religions"]) / 7
    )
    assert summary["unweighted"] == pytest.approx(sum(subj.values()) / 2)
    # MMLU 5-shot with lm-eval's own template: five dev shots before the question
    context, continuation = raw["mmlu"]["samples"]["cm_mmlu_world_religions"][0]["arguments"][0]
    assert context.startswith(
        "The following are multiple choice questions (with answers) about world religions."
    )
    assert context.count("\nAnswer:") == 6 and continuation == " A"
    # the lm-eval MTB tasks see exactly the OpenCompass sequences ...
    dev, test = mtb.load_questions(MTB_FIXTURE, limit=4)
    for task, shots in (("musictheorybench_zero_shot", []), ("musictheorybench_few_shot", dev)):
        samples = sorted(raw["mtb"]["samples"][task], key=lambda s: s["doc_id"])
        for sample, q in zip(samples, test, strict=True):
            for (ctx, cont), letter in zip(sample["arguments"], "ABCD", strict=True):
                assert ctx + cont == mtb.candidate_text(q, letter, shots)
        # ... and, with one shared prefix, single-token letters and no BOS, rank like the whole-sequence PPL
        cands = [mtb.candidate_texts(q, shots) for q in test]
        ours = [s.pred for s in scoring.one_pass(model, tokenizer, cands)]
        accuracy = sum(mtb.LETTERS[p] == q["target"] for p, q in zip(ours, test, strict=True)) / len(test)
        assert summary["mtb_lm_eval"][task] == pytest.approx(accuracy)


def test_several_models_get_a_comparison_table_and_results_csvs(tiny_model_path, tmp_path):
    from chatmusician.config import parse_config

    cfg = parse_config(EvalConfig, ["--models", f"{tiny_model_path},{tiny_model_path}/"])
    assert cfg.models == f"{tiny_model_path},{tiny_model_path}/"
    cfg.output_dir, cfg.device, cfg.pool.use_ray = str(tmp_path / "runs"), "cpu", False
    cfg.mtb.modes, cfg.mtb.limit, cfg.mtb.bootstrap = ["ppl_zero_shot"], 3, 10
    cfg.mmlu.enabled, cfg.mmlu.limit = True, 2
    runner.run(cfg)
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert folders == ["0-tiny-llama-nano-" + Path(tiny_model_path).name.split("-")[-1],
                       "1-tiny-llama-nano-" + Path(tiny_model_path).name.split("-")[-1]]  # fmt: skip
    first = tmp_path / "runs" / folders[0]
    subjects = (first / "mtb_subjects.csv").read_text().splitlines()
    assert subjects[0] == "mode,order,subject,questions,accuracy"
    assert subjects[1].startswith("ppl_zero_shot,original,knowledge,3,")
    assert (first / "mmlu_subjects.csv").read_text().splitlines()[1].startswith("high_school_mathematics,2,")
    table = (tmp_path / "runs" / "comparison.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| MTB ppl_zero_shot original order |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert len(cells) == 2 and cells[0] == cells[1]  # the same model twice: the same numbers
    assert "| MMLU unweighted mean (OpenCompass PPL) |" in table
    # an earlier results folder joins a later run's table
    again = EvalConfig(
        model=tiny_model_path, output_dir=str(tmp_path / "later"), device="cpu", compare=str(first)
    )
    again.pool.use_ray, again.mtb.modes, again.mtb.limit, again.mtb.bootstrap = (
        False,
        ["ppl_zero_shot"],
        3,
        10,
    )
    runner.run(again)
    header = (tmp_path / "later" / "comparison.csv").read_text().splitlines()[0]
    assert header == f"metric,{tiny_model_path},{first}"


def test_a_failing_lm_eval_cross_check_is_reported_and_loses_nothing(tiny_model_path, tmp_path, monkeypatch):
    from chatmusician.eval import mmlu

    def broken(cfg):
        raise RuntimeError("no tasks")

    monkeypatch.setattr(mmlu, "run", broken)
    cfg = EvalConfig(model=tiny_model_path, output_dir=str(tmp_path), device="cpu")
    cfg.pool.use_ray, cfg.mtb.enabled = False, False
    cfg.mmlu.enabled, cfg.mmlu.lm_eval, cfg.mmlu.path, cfg.mmlu.limit = True, True, MMLU_FIXTURE, 1
    out = runner.evaluate(cfg)
    assert out["mmlu"]["sizes"] == {"high_school_mathematics": 1, "world_religions": 1}
    assert out["mmlu_lm_eval"] == {"error": "RuntimeError: no tasks"}
    assert "cross-check failed: RuntimeError: no tasks" in (tmp_path / "results.md").read_text()
