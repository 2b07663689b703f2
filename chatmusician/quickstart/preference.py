"""Stage 7: one preference round on the SFT model — sample answers, score them with music rewards, pair the best
valid answer against the worst, DPO-Positive on a LoRA adapter (its reference: the same model with the adapter
off), merged; the guards (strict validity, bar alignment, diversity, memorisation, validation perplexity) are
measured before and after. A round that breaks a guard or finds no valid pair leaves the SFT model in place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatmusician.quickstart.config import QuickstartConfig
from chatmusician.quickstart.console import Console
from chatmusician.quickstart.data import header_description

GUARDS = ("strict_validity", "bar_alignment_error", "diversity", "memorisation", "val_perplexity")


def prompts_file(tunes: list[str], n: int, path: Path) -> Path:
    """``n`` text-to-music requests described from tunes spread over the corpus (the SFT set's kind of prompt,
    other tunes than the compose stage's), each asking for its key and meter."""
    step = max(1, len(tunes) // max(1, n))
    rows = []
    for i, tune in enumerate(tunes[step // 4 :: step][:n]):
        description = {k: v for k, v in header_description(tune).items() if k != "Title"}
        request = {"key": description.get("Key"), "meter": description.get("Meter")}
        rows.append(
            {
                "name": f"tune-{i}",
                "family": "text_to_music",
                "fields": {"description": description},
                "request": {k: v for k, v in request.items() if v},
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def preference_round(
    cfg: QuickstartConfig, console: Console, model: str, tunes: list[str], out: Path
) -> dict:
    """``{"model": the model the next stages use, "before"/"after": guards, "pairs", "status"}``."""
    import dataclasses

    from chatmusician.prefs.rounds import RoundsStopped, run_rounds

    root = out / "preference"
    prompts = str(prompts_file(tunes, cfg.prefs_prompts, root / "prompts.json"))
    train_tunes = out / "data" / "pt.jsonl"
    rounds = dataclasses.replace(
        cfg.rounds,
        rounds=1,
        model=model,
        output_dir=str(root),
        eval_prompts=prompts,
        val_shards=str(out / "shards" / "sft" / "val"),
        prefs=dataclasses.replace(cfg.rounds.prefs, prompts=prompts, train_tunes=str(train_tunes)),
    )
    dpo = dataclasses.replace(cfg.dpo, max_length=cfg.max_len)
    try:
        rows = run_rounds(rounds, dpo)
        status, chosen = "ok", rows[-1]["model"]
    except RoundsStopped as stop:
        rows = json.loads((root / "rounds.json").read_text()) if (root / "rounds.json").exists() else []
        # The stopped round's own status names the broken guards, before -> after (the exception adds where).
        status = rows[-1]["status"] if len(rows) > 1 else f"stopped: {stop}"
        chosen = model
    before = {g: rows[0].get(g) for g in GUARDS} if rows else {}
    after = {g: rows[-1].get(g) for g in GUARDS} if len(rows) > 1 else {}
    for name in GUARDS:
        if name in after:
            console.detail(f"{name}: {_fmt(before.get(name))} -> {_fmt(after.get(name))}")
    console.detail(f"{root}/rounds.md, rounds.png; {status}")
    return {
        "model": chosen,
        "before": before,
        "after": after,
        "pairs": rows[-1].get("pairs") if len(rows) > 1 else 0,
        "status": status,
        "table": str(root / "rounds.md"),
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
