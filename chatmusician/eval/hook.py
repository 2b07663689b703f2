"""The training recipe's evaluation hook: a small MusicTheoryBench PPL evaluation of the model being trained.

Point the train config's ``eval_hook`` at ``chatmusician.eval.hook:mtb_accuracy``; rank 0 calls it with
``(model, tokenizer, step)`` and reports the returned metrics beside the loss, so a run or a sweep shows MTB
accuracy over time. The questions are the shipped fixture by default; set ``CHATMUSICIAN_EVAL_MTB`` to a hub id
or a local folder to use the real benchmark (``CHATMUSICIAN_EVAL_MTB_LIMIT`` keeps the first N questions).
"""

from __future__ import annotations

import os
from typing import Any

from chatmusician.eval import mtb, scoring
from chatmusician.eval.config import MTB_FIXTURE


def mtb_ppl_metrics(
    model,
    tokenizer,
    path: str = MTB_FIXTURE,
    few_shot: bool = False,
    limit: int | None = None,
    max_seq_len: int = 2048,
    batch_size: int = 8,
) -> dict[str, float]:
    """Zero- (or few-) shot MTB accuracy of ``model`` by one-pass PPL scoring, overall and per subject."""
    dev, test = mtb.load_questions(path, limit=limit)
    shots = dev[:5] if few_shot else []  # OpenCompass's fix_id_list=[0..4]

    def token_len(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    candidates = [mtb.candidate_texts(q, shots, token_len, max_seq_len, few_shot) for q in test]
    scored = scoring.one_pass(model, tokenizer, candidates, max_seq_len, batch_size)
    records = [
        {
            "id": q["id"],
            "subject": q["subject"],
            "shuffle": -1,
            "pred": mtb.LETTERS[s.pred],
            "target": q["target"],
        }
        for q, s in zip(test, scored, strict=True)
    ]
    summary = mtb.summarize(records, resamples=0)
    out = {"mtb_accuracy": summary["accuracy"], "mtb_questions": float(summary["questions"])}
    out |= {f"mtb_{subject}": acc for subject, acc in summary["subjects"].items()}
    return out


def _unwrap(model):
    """The torch module under a DeepSpeed engine or DDP wrapper (``.module``)."""
    while hasattr(model, "module") and not hasattr(model, "generate"):
        model = model.module
    return model


def mtb_accuracy(model, tokenizer, step: int) -> dict[str, Any]:
    """``eval_hook`` entry: MTB zero-shot PPL accuracy at ``step``; the model's train/eval mode is restored."""
    module = _unwrap(model)
    was_training = module.training
    module.eval()
    try:
        limit = os.environ.get("CHATMUSICIAN_EVAL_MTB_LIMIT")
        return mtb_ppl_metrics(
            module,
            tokenizer,
            path=os.environ.get("CHATMUSICIAN_EVAL_MTB", MTB_FIXTURE),
            limit=int(limit) if limit else None,
        )
    finally:
        module.train(was_training)
