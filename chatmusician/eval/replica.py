"""A model replica of the evaluation: loads the model once, then answers batches of work items.

Work items are rows ``{key, kind, payload}`` (``payload`` a JSON string, so that one Arrow schema carries every
kind): ``ppl`` (score the four candidates of a MusicTheoryBench or MMLU question), ``gen`` (answer a question in free text) and ``abc``
(compose a tune). The same :func:`process` serves the Ray Data actor (:class:`Replica`) and the
single-process loop, so both give the same answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from chatmusician.eval import mmlu_ppl, mtb, scoring
from chatmusician.eval.config import EvalConfig
from chatmusician.eval.generation import chat_prompts, generate, generate_counted, sampling_kwargs


def load_for_eval(cfg: EvalConfig, threads: int | None = None):
    """(model, tokenizer) in eval mode on the configured device, any adapter merged in."""
    import torch

    from chatmusician.model.loading import load_model, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model = load_model(cfg.model, precision=cfg.precision)
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
    return model.to(device).eval(), tokenizer


def _ppl(
    model, tokenizer, payloads: Sequence[Mapping[str, Any]], cfg: EvalConfig, batch_size: int
) -> list[dict]:
    def token_len(text: str) -> int:  # OpenCompass's get_token_len: tokenizer.encode, BOS when added
        return len(tokenizer(text)["input_ids"])

    def build(p: Mapping[str, Any]) -> tuple[list[str], list[int], str]:
        literal, limit = p.get("literal", True), cfg.mtb.max_seq_len
        if p.get("bench") == "mmlu":
            return mmlu_ppl.candidates(p["subject"], p["question"], p["shots"], token_len, limit, literal)
        return mtb.candidates(p["question"], p["shots"], token_len, limit, p.get("few_shot"), literal)

    built = [build(p) for p in payloads]
    method = scoring.one_pass if cfg.mtb.one_pass else scoring.four_pass
    scored = method(model, tokenizer, [texts for texts, _, _ in built], cfg.mtb.max_seq_len, batch_size)
    return [
        {
            "scores": [s if math.isfinite(s) else None for s in sc.scores],
            "pred": mtb.LETTERS[sc.pred],
            "method": sc.method,
            "shots_kept": kept,  # per candidate: the prompts can be rebuilt for the predictions files
        }  # fmt: skip
        for sc, (_, kept, _) in zip(scored, built, strict=True)
    ]


def _gen(model, tokenizer, payloads: Sequence[Mapping[str, Any]], cfg: EvalConfig) -> list[dict]:
    prompts = chat_prompts(
        [mtb.chat_question(p["question"]) for p in payloads],
        [[tuple(t) for t in mtb.chat_history(p["shots"])] for p in payloads],
    )
    kwargs = sampling_kwargs(cfg.mtb.gen_max_new_tokens, cfg.mtb.gen_temperature)
    texts = generate(model, tokenizer, prompts, seed=cfg.mtb.seed, **kwargs)
    return [{"text": t, "pred": mtb.extract_letter(t)} for t in texts]


def _abc(model, tokenizer, payloads: Sequence[Mapping[str, Any]], cfg: EvalConfig) -> list[dict]:
    q = cfg.abc_quality
    kwargs = sampling_kwargs(q.max_new_tokens, q.temperature, q.top_p, q.top_k, q.repetition_penalty)
    # The answer's forced start (prefs' chosen_header), written before the model's own tokens.
    prefixes = [p.get("answer_prefix", "") for p in payloads]
    answers = generate_counted(
        model,
        tokenizer,
        [
            chat + prefix
            for chat, prefix in zip(chat_prompts([p["prompt"] for p in payloads]), prefixes, strict=True)
        ],
        constrained=q.constrained,
        constraints=[p.get("request") for p in payloads],
        seeds=[int(p["seed"]) for p in payloads],  # each item its own: batching does not change answers
        **kwargs,
    )
    return [{"text": prefix + t, "tokens": n} for prefix, (t, n) in zip(prefixes, answers, strict=True)]


def process(model, tokenizer, rows: Sequence[Mapping[str, Any]], cfg: EvalConfig) -> list[dict[str, Any]]:
    """Answer work items (any mix of kinds) in their order: ``{key, kind, result}`` with ``result`` as JSON."""
    results: list[dict | None] = [None] * len(rows)
    by_kind: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_kind.setdefault(row["kind"], []).append(i)
    handlers = {
        "ppl": lambda p: _ppl(model, tokenizer, p, cfg, cfg.pool.batch_size),
        "gen": lambda p: _gen(model, tokenizer, p, cfg),
        "abc": lambda p: _abc(model, tokenizer, p, cfg),
    }
    for kind, idx in by_kind.items():
        if kind not in handlers:
            raise ValueError(f"unknown work kind {kind!r}")
        for i, res in zip(idx, handlers[kind]([json.loads(rows[i]["payload"]) for i in idx]), strict=True):
            results[i] = res
    return [
        {"key": row["key"], "kind": row["kind"], "result": json.dumps(res)}
        for row, res in zip(rows, results, strict=True)
    ]


class Replica:
    """Ray Data actor: one model copy per actor, batches of work items in, results out."""

    def __init__(self, cfg: EvalConfig, threads: int | None = None):
        self.cfg = cfg
        self.model, self.tokenizer = load_for_eval(cfg, threads)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        rows = [{k: batch[k][i] for k in ("key", "kind", "payload")} for i in range(len(batch["key"]))]
        out = process(self.model, self.tokenizer, rows, self.cfg)
        return {k: [r[k] for r in out] for k in ("key", "kind", "result")}
