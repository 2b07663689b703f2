"""The vllm engine's meter logits processor (``chatmusician.serve.engines.vllm_meter``): constrained tokens/s with
it and without it (``vllm.meter_mask``), and what it changes in the answers (cut back, bars, bar-duration
issues), on the tiny random model (seeded sampling, six meters). Runs in the vLLM environment:

    .venv-vllm/bin/python -m benchmarks.vllm_meter [MODEL] [--seeds 3] [--budget 128] [--rounds 2]
        [--batches 1,18] [--json out.json]

MODEL defaults to the cached nano model (``chatmusician.model.tiny.ensure_tiny``). The random model's logits
are nearly flat, so the mask tries many candidates per step: a worst case for its cost; its sampling gets a
music bias (``--no_bias`` for a trained model, e.g. the quickstart's ``outputs/quickstart/models/chatmusician-tiny``). Arms alternate within
each round (a fresh in-process engine each); tokens/s = tokens vLLM sampled for the constrained rows / wall
time of their ``generate`` calls; the median over rounds is printed with the processor's mask time per row
and step. The same workload is the test's (tests/vllm_meter_process.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

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


def biased_sampling(plain, tokenizer):
    """``sampling_kwargs`` with the music bias on the seeded (constrained) rows; the others stay greedy."""
    bias = music_bias(tokenizer)

    def sampling_kwargs(params, pad_id, eos_id):
        kwargs = plain(params, pad_id, eos_id)
        if params.seed is not None:
            kwargs["logit_bias"] = {**bias, **kwargs.get("logit_bias", {})}
        return kwargs

    return sampling_kwargs


def _answer(prepared, completion, sampled: list[int]) -> dict:
    from chatmusician.abc import bar_durations, extract_tunes, validate_tune

    tunes = extract_tunes(completion.text).tunes  # the tune as downstream tools read it
    issues = [i.code for i in validate_tune(tunes[0]) if i.code == "bar_duration"] if tunes else None
    whole = [
        i.code for i in validate_tune(completion.text) if i.severity == "error" or i.code == "bar_duration"
    ]
    return {
        "meter": prepared.constraints.meter,
        "text": completion.text,
        "reason": completion.finish_reason,
        "tokens": completion.completion_tokens,
        "bar_duration": issues,
        "whole_issues": whole,  # the whole answer read as one tune: errors and bar durations
        "bars": sum(len(bars) for bars in bar_durations(completion.text).values()),
        "sampled": sampled,
    }


def arm(
    model: str,
    meter_mask: bool,
    seeds: int,
    budget: int,
    engine_process: bool = False,
    batches: tuple[int | None, ...] = (None,),
    free: bool = True,
    bias: bool = True,
) -> dict:
    """One engine (``meter_mask`` on or off): ``seeds`` x six constrained rows, sent ``batch`` at a time for each
    of ``batches`` (None: all at once, with two greedy unconstrained rows in the same batch when ``free``)."""
    from chatmusician.abc.grammar import AbcConstraints
    from chatmusician.serve.config import EngineConfig, VllmOptions
    from chatmusician.serve.engines import vllm_engine, vllm_meter
    from chatmusician.serve.types import GenerationParams

    config = EngineConfig(
        model=model,
        max_prompt_tokens=64,
        max_new_tokens_cap=budget,
        vllm=VllmOptions(meter_mask=meter_mask, engine_process=engine_process, max_num_seqs=64),
    )
    engine = vllm_engine.VllmEngine(config)
    plain = vllm_engine.sampling_kwargs
    if bias:
        vllm_engine.sampling_kwargs = biased_sampling(plain, engine.tokenizer)
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
    extra = [(engine.prepare(p), GenerationParams(0.0, 1.0, 0, 1.0, 24)) for p in PROMPTS] if free else []
    result: dict = {"meter_mask": meter_mask, "timings": {}}
    try:
        for batch in batches:
            raw.clear()
            engine.cut_backs = 0
            masked = dict(vllm_meter.STATS)
            size = batch or len(items)
            out, seconds = [], 0.0
            for k in range(0, len(items), size):
                chunk = items[k : k + size] + (extra if batch is None else [])
                started = time.perf_counter()
                out += engine.generate(chunk)
                seconds += time.perf_counter() - started
            constrained = out[: len(items)]
            sampled = sum(len(r) for r in raw)
            steps = vllm_meter.STATS["masked"] - masked["masked"]
            mask_s = vllm_meter.STATS["seconds"] - masked["seconds"]
            result["timings"][str(batch or len(items))] = {
                "tokens_per_s": sampled / seconds,
                "sampled": sampled,
                "seconds": seconds,
                "mask_ms_per_row_step": 1000 * mask_s / steps if steps else None,
            }
            result["cut_backs"] = engine.cut_backs
            result["answers"] = [
                _answer(p, c, r) for (p, _), c, r in zip(items, constrained, raw, strict=True)
            ]
            result["free"] = [c.text for c in out[len(items) :]] if batch is None else []
    finally:
        vllm_engine.sampling_kwargs = plain
        engine.shutdown()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", default="1,18")
    parser.add_argument("--no_bias", action="store_true", help="a trained model: no music bias, top_k 8 kept")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.model is None:
        from chatmusician.model.tiny import ensure_tiny

        args.model = str(ensure_tiny("nano"))
    batches = tuple(int(b) for b in args.batches.split(","))
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
            runs[name].append(
                arm(args.model, name == "on", args.seeds, args.budget, batches=batches, free=False)
            )
    summary: dict = {"load_average": os.getloadavg(), "batches": {}}
    for batch in batches:
        key = str(batch)
        row = {}
        for name, arms in runs.items():
            timing = [a["timings"][key] for a in arms]
            answers = arms[-1]["answers"]
            row[name] = {
                "tokens_per_s": statistics.median(t["tokens_per_s"] for t in timing),
                "rounds": [round(t["tokens_per_s"], 1) for t in timing],
                "mask_ms_per_row_step": timing[-1]["mask_ms_per_row_step"],
                "cut_back": sum(a["reason"] == "length" for a in answers),
                "bars": sum(a["bars"] for a in answers),
                "issues": sum(len(a["whole_issues"]) for a in answers),  # an empty answer: its errors
            }
        row["ratio"] = row["on"]["tokens_per_s"] / row["off"]["tokens_per_s"]
        summary["batches"][key] = row
        on, off = row["on"], row["off"]
        mask = on["mask_ms_per_row_step"]
        print(
            f"batch {batch:>2}: tokens/s {off['tokens_per_s']:.0f} -> {on['tokens_per_s']:.0f} with the meter mask "
            f"({row['ratio']:.2f}x; rounds {off['rounds']} -> {on['rounds']}); mask "
            f"{mask:.2f} ms/row/step; cut back {off['cut_back']} -> {on['cut_back']} of {len(answers)}; bars "
            f"{off['bars']} -> {on['bars']}; validator errors and bar issues {off['issues']} -> {on['issues']}"
        )
    print(f"load average {summary['load_average']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
