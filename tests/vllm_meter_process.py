"""Run by tests/test_serve_vllm_units.py in the vLLM environment: constrained answers of the tiny random model on
the vllm engine over several meters (seeded sampling), with the meter logits processor and without it
(``vllm.meter_mask``), and greedy unconstrained answers in the same batch; prints one JSON line per arm. Arms:
``on``, ``off``, ``on-process`` (the processor in vLLM's engine core process). Usage:
``python tests/vllm_meter_process.py MODEL SEEDS BUDGET on,off,on-process``."""

import json
import sys
import time

from chatmusician.abc import bar_durations, extract_tunes, validate_tune
from chatmusician.abc.grammar import AbcConstraints
from chatmusician.serve.config import EngineConfig, VllmOptions
from chatmusician.serve.engines import vllm_engine
from chatmusician.serve.engines.vllm_engine import VllmEngine
from chatmusician.serve.types import GenerationParams

METERS = ("4/4", "3/4", "6/8", "2/4", "9/8", "5/4")
TOP_K = 8  # both arms: the meter mask keeps 8 candidates at most on these flat logits
PROMPTS = ("Compose a reel in G.", "A jig, please.")
MUSIC = set("ABCDEFGabcdefgz|/2345678 >(3[]:-{}^_=,'")


def music_bias(tokenizer) -> dict[int, float]:
    """The random model's logits are nearly flat (std ~0.2): music characters and the M:/L:/K: lines likelier,
    so that a short budget reaches well into the body (as tests/test_constrained_meter.py's random rows)."""
    bias = {}
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        text = piece.replace("\u2581", " ")
        if text and all(ch in MUSIC for ch in text):
            bias[i] = 6.0
        if text.strip() in ("M", "L", "K", "M:", "L:", "K:"):
            bias[i] = 6.5
    bias[tokenizer.convert_tokens_to_ids("<0x0A>")] = 10.0
    return bias


def biased_sampling(tokenizer):
    plain = vllm_engine.sampling_kwargs
    bias = music_bias(tokenizer)

    def sampling_kwargs(params, pad_id, eos_id):
        kwargs = plain(params, pad_id, eos_id)
        if params.seed is not None:  # the constrained rows: the unconstrained ones stay greedy on the model
            kwargs["logit_bias"] = {**bias, **kwargs.get("logit_bias", {})}
        return kwargs

    return sampling_kwargs


def arm(model: str, meter_mask: bool, seeds: int, budget: int, engine_process: bool = False) -> dict:
    config = EngineConfig(
        model=model,
        max_prompt_tokens=64,
        max_new_tokens_cap=budget,
        vllm=VllmOptions(meter_mask=meter_mask, engine_process=engine_process, max_num_seqs=64),
    )
    engine = VllmEngine(config)
    vllm_engine.sampling_kwargs = biased_sampling(engine.tokenizer)
    raw, finish_tune = [], engine._finish_tune

    def record(constraints, new_ids, budget):  # what vLLM sampled, before the completion or the cut-back
        raw.append(list(new_ids))
        return finish_tune(constraints, new_ids, budget)

    engine._finish_tune = record
    items = []
    for seed in range(seeds):
        for i, meter in enumerate(METERS):
            prepared = engine.prepare(PROMPTS[i % 2])
            prepared.constraints = AbcConstraints(meter=meter, unit_length="1/8", key="G")
            items.append((prepared, GenerationParams(1.0, 1.0, TOP_K, 1.0, budget, seed=seed * 100 + i)))
    free = [(engine.prepare(p), GenerationParams(0.0, 1.0, 0, 1.0, 24)) for p in PROMPTS]
    started = time.perf_counter()
    out = engine.generate(items + free)
    seconds = time.perf_counter() - started
    answers = []
    for (prepared, _), completion, sampled in zip(items, out[: len(items)], raw, strict=True):
        tunes = extract_tunes(completion.text).tunes  # the tune as downstream tools read it
        issues = [i.code for i in validate_tune(tunes[0]) if i.code == "bar_duration"] if tunes else None
        whole = [
            i.code
            for i in validate_tune(completion.text)
            if i.severity == "error" or i.code == "bar_duration"
        ]
        answers.append(
            {
                "meter": prepared.constraints.meter,
                "text": completion.text,
                "reason": completion.finish_reason,
                "tokens": completion.completion_tokens,
                "bar_duration": issues,
                "whole_issues": whole,  # the whole answer read as one tune: errors and bar durations
                "bars": sum(len(bars) for bars in bar_durations(completion.text).values()),
                "sampled": sampled,
            }  # fmt: skip
        )
    result = {
        "meter_mask": meter_mask,
        "cut_backs": engine.cut_backs,
        "answers": answers,
        "free": [c.text for c in out[len(items) :]],
        "seconds": seconds,
        "tokens": sum(c.completion_tokens for c in out[: len(items)]),
    }
    engine.shutdown()
    return result


if __name__ == "__main__":  # the engine core process is spawned: it re-imports this module
    model, seeds, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    arms = sys.argv[4].split(",") if len(sys.argv) > 4 else ["on", "off"]
    for name in arms:
        print(
            json.dumps(
                arm(model, name.startswith("on"), seeds, budget, engine_process=name.endswith("process"))
            )
        )
