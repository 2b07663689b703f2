"""Constrained vs unconstrained generation: parse success, metrical correctness and tokens/s, on a trained tiny
model and a random one.

    .venv/bin/python -m benchmarks.constrained [--model PATH] [--prompts 8] [--max_new_tokens 256]

``--model`` is the quickstart's trained model (e.g. its merged SFT model); without it the benchmark trains
the nano model itself for ``--train_steps`` on the Nottingham tunes (plain PyTorch, a few minutes on CPU).
The random model is the untrained nano model. Same prompts and per-row seeds for every arm (temperature 0.8,
top-k 40, top-p 0.95, repetition penalty 1.1, drawn by the engine's ``RowSampler``). Metrical correctness per
arm (constrained decoding is meter-aware): the share of tunes with no ``bar_duration`` issue from the validator
(an answer with no tune counts as not correct), and the bar-alignment error, bars whose length differs from
the meter / bars checked, over all the arm's tunes (NotaGen's metric). Parse success = an ABC tune is found,
the validator reports no error other than bar durations, and abc2midi writes a MIDI that the renderer's judge
finds usable (it parses, plays notes and lasts about what the bars say: ``chatmusician.render.judge``;
abc2midi's messages are warnings there, as in rendering). Speed = tokens the model generated per second (EOS
included; a cut-back answer's dropped tokens count: they were decoded), constrained vs unconstrained, at batch
1 and 8, the median ratio over ``--rounds`` alternating rounds, plus the constrained processor's time (grammar
mask, meter checks, completion search) per token and row.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class ConstrainedBenchConfig:
    """What the constrained-decoding benchmark runs."""

    model: str | None = None
    """Trained model path (the quickstart's); None = train the nano model here."""
    train_steps: int = 300
    """Steps of the in-benchmark training when no model is given."""
    prompts: int = 8
    """Prompts (one seed each) per arm."""
    max_new_tokens: int = 256
    """Generation budget per answer."""
    threads: int = 2
    """torch threads."""
    rounds: int = 3
    """Speed rounds per arm, unconstrained and constrained alternating; the median ratio is the figure (one
    round swings ±15 % with the load of a shared 2-core machine)."""


PROMPTS = [
    "Write a jig in D major.",
    "Compose a reel in G.",
    "Write a waltz in 3/4 time.",
    "Compose a hornpipe in A minor.",
    "Write a polka.",
    "Compose a slip jig in E dorian.",
    "Write a march in 2/4.",
    "Compose a slow air in F.",
]


def train_tiny(steps: int, out: Path) -> Path:
    """The nano model trained on Nottingham tunes as chat answers (plain PyTorch loop, AdamW 3e-3)."""
    import random

    import torch

    from chatmusician.corpora import nottingham_tunes
    from chatmusician.model.loading import load_model, load_tokenizer
    from chatmusician.model.tiny import ensure_tiny
    from chatmusician.prompts import build_chat_prompt

    base = str(ensure_tiny("nano"))
    tok, model = load_tokenizer(base), load_model(base)
    tunes = nottingham_tunes()
    rows = [
        tok(build_chat_prompt(random.Random(i).choice(PROMPTS)) + t + "\n", add_special_tokens=False)[
            "input_ids"
        ][:384]
        + [tok.eos_token_id]
        for i, t in enumerate(tunes)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for step in range(steps):
        batch = rng.sample(rows, 8)
        width = max(len(r) for r in batch)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in batch])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in batch])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def parses(text: str) -> bool:
    from chatmusician.abc import extract_tunes, validate_tune

    found = extract_tunes(text)
    if not found.tunes:
        return False
    tune = found.tunes[0]
    errors = [i for i in validate_tune(tune) if i.severity == "error" and "bar" not in i.code]
    if errors:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t.abc").write_text(tune + "\n", encoding="utf-8")
        number = tune.split("\n", 1)[0][2:].strip() or "1"
        out = subprocess.run(
            ["abc2midi", "t.abc", number, "-o", "t.mid"], cwd=tmp, capture_output=True, timeout=30
        )
        return (Path(tmp) / "t.mid").exists() and usable_midi(Path(tmp) / "t.mid", tune, out.returncode)


def bar_counts(text: str) -> tuple[int, int] | None:
    """(bars whose length differs from the meter, bars checked) of the answer's tune, by the validator's
    ``bar_duration`` check; None when no tune is found."""
    from chatmusician.abc import extract_tunes, parse_tune
    from chatmusician.eval.music_metrics import bar_alignment

    found = extract_tunes(text)
    if not found.tunes:
        return None
    try:
        return bar_alignment(parse_tune(found.tunes[0]))
    except Exception:  # noqa: BLE001 - a tune the tokenizer cannot read: nothing checked
        return None


def usable_midi(path: Path, tune: str, returncode: int) -> bool:
    """The renderer's judgement of a MIDI: it parses, plays notes and lasts about what the bars say."""
    from chatmusician.render.judge import midi_facts, midi_problem

    try:
        length_s, notes = midi_facts(path)
    except Exception:  # noqa: BLE001 - mido's errors on a malformed file
        return False
    return returncode == 0 and midi_problem(length_s, notes, tune) is None


def run_arm(model, tok, constrained: bool, batch: int, cfg: ConstrainedBenchConfig) -> dict:
    from chatmusician.abc.grammar import AbcConstraints
    from chatmusician.model import constrained_decoding as C
    from chatmusician.model.sampling import RowSampling
    from chatmusician.prompts import build_chat_prompt

    prompts = [build_chat_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(cfg.prompts)]
    texts, tokens, seconds, mask_s, mask_steps = [], 0, 0.0, 0.0, 0
    made = []
    original = C.logits_processor

    def spy(*args, **kwargs):
        processor, rows = original(*args, **kwargs)
        made.append(processor)
        return processor, rows

    C.logits_processor = spy
    try:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            sampling = [
                RowSampling(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=start + r)
                for r in range(len(chunk))
            ]
            constraints = [AbcConstraints() if constrained else None] * len(chunk)
            began = time.perf_counter()
            outs = C.generate_outputs(model, tok, chunk, constraints, cfg.max_new_tokens, sampling)
            seconds += time.perf_counter() - began
            texts += [o.text for o in outs]
            tokens += sum(o.generated for o in outs)
    finally:
        C.logits_processor = original
    for p in made:
        if p is not None:
            mask_s, mask_steps = mask_s + p.mask_seconds, mask_steps + p.steps * len(p.active)
    counts = [bar_counts(t) for t in texts]
    return {
        "parse": sum(parses(t) for t in texts) / len(texts),
        "bars_ok": sum(c is not None and c[0] == 0 for c in counts) / len(texts),
        "bar_error": sum(c[0] for c in counts if c) / max(1, sum(c[1] for c in counts if c)),
        "tok_s": tokens / seconds,
        "mask_ms": 1e3 * mask_s / mask_steps if mask_steps else None,
    }


def main(cfg: ConstrainedBenchConfig) -> None:
    import torch

    from chatmusician.model.loading import load_model, load_tokenizer
    from chatmusician.model.tiny import ensure_tiny

    torch.set_num_threads(cfg.threads)
    trained = cfg.model
    if trained is None:
        print(f"training the nano model for {cfg.train_steps} steps (no --model given)", flush=True)
        trained = str(train_tiny(cfg.train_steps, Path(tempfile.mkdtemp()) / "trained"))
    for name, path in [("trained", trained), ("random", str(ensure_tiny("nano")))]:
        tok, model = load_tokenizer(path), load_model(path).eval()
        for batch in (1, 8):
            rounds = [(run_arm(model, tok, False, batch, cfg), run_arm(model, tok, True, batch, cfg))
                      for _ in range(max(1, cfg.rounds))]  # fmt: skip
            ratios = [c["tok_s"] / p["tok_s"] for p, c in rounds]
            plain, cons = rounds[ratios.index(statistics.median_low(ratios))]
            mask = f"{cons['mask_ms']:.3f}" if cons["mask_ms"] is not None else "-"
            print(
                f"{name:8s} batch {batch}: parse {plain['parse']:.0%} -> {cons['parse']:.0%} constrained; "
                f"no bar-duration issue {plain['bars_ok']:.0%} -> {cons['bars_ok']:.0%}; "
                f"bar-alignment error {plain['bar_error']:.1%} -> {cons['bar_error']:.1%}; "
                f"tokens/s {plain['tok_s']:.0f} -> {cons['tok_s']:.0f} ({statistics.median(ratios):.2f}x median; "
                f"rounds {', '.join(f'{r:.2f}' for r in ratios)}); mask {mask} ms/token/row",
                flush=True,
            )


if __name__ == "__main__":
    from jsonargparse import auto_cli

    main(auto_cli(ConstrainedBenchConfig, as_positional=False))
