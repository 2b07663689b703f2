"""The training recipe's eval hook: a small MTB PPL evaluation of the model being trained."""

from __future__ import annotations

import pytest

from chatmusician.eval import hook, replica
from chatmusician.eval.config import MTB_FIXTURE, EvalConfig
from chatmusician.eval.runner import mtb_items, mtb_results


def test_hook_reports_the_zero_shot_ppl_accuracy_and_restores_train_mode(tiny_model_path, monkeypatch):
    from chatmusician.eval.mtb import load_questions
    from chatmusician.model.loading import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_path), load_tokenizer(tiny_model_path)
    model.train()
    monkeypatch.delenv("CHATMUSICIAN_EVAL_MTB", raising=False)
    monkeypatch.setenv("CHATMUSICIAN_EVAL_MTB_LIMIT", "6")
    metrics = hook.mtb_accuracy(model, tokenizer, step=10)
    assert model.training  # handed back as it came
    # the same numbers as the full evaluation's ppl_zero_shot on the same six questions
    dev, test = load_questions(MTB_FIXTURE, limit=6)
    cfg = EvalConfig(model=tiny_model_path)
    cfg.mtb.modes, cfg.mtb.bootstrap = ["ppl_zero_shot"], 10
    model.eval()
    full = mtb_results(
        cfg, test, replica.process(model, tokenizer, mtb_items(dev, test, cfg.mtb.modes, 0, 0), cfg)
    )
    expected = full["ppl_zero_shot"]["original"]
    assert metrics["mtb_accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["mtb_questions"] == 6
    assert {k: metrics[f"mtb_{k}"] for k in expected["subjects"]} == pytest.approx(expected["subjects"])
    assert all(isinstance(v, float) for v in metrics.values())
