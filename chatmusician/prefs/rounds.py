"""``chatmusician rounds`` (``ray_jobs.rounds``): K preference rounds, NotaGen's loop with music guards.

Round 0 measures the starting model (``model``, with ``adapter`` merged in). Round k: ``prefs`` samples and
pairs on model k-1, ``dpo`` trains a LoRA adapter on model k-1 (the adapter disabled = model k-1 is the
reference), the adapter is merged into model k, and model k is evaluated: strict validity, bar-alignment error,
diversity, memorisation (:mod:`chatmusician.prefs.guards`) and validation perplexity. After every round
rounds.md / rounds.csv / rounds.png / rounds.json are rewritten; a round that worsens a guard past its limit
(against round 0) stops the loop with one line naming the guard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from chatmusician.prefs import guards
from chatmusician.prefs.config import RoundsConfig


class RoundsStopped(RuntimeError):
    """A round worsened a guard past its limit."""


def check_config(cfg: RoundsConfig, dpo=None) -> None:
    from chatmusician.prefs.job import check_config as check_prefs

    if cfg.rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {cfg.rounds}")
    if dpo is None and (not cfg.dpo or not Path(cfg.dpo).is_file()):
        raise ValueError(f"dpo: a chatmusician dpo config YAML is required, got {cfg.dpo!r}")
    if cfg.eval_n_per_prompt < 1:
        raise ValueError("eval_n_per_prompt must be at least 1")
    check_prefs(cfg.prefs)


def dpo_config(cfg: RoundsConfig, k: int, model: str, pairs: str, base=None):
    """Round ``k``'s DPO config: ``base`` (a DPOConfig; default: the ``dpo`` YAML) on ``model`` and ``pairs``."""
    from chatmusician.config import load_config
    from chatmusician.train.config import DPOConfig

    base = base if base is not None else load_config(DPOConfig, cfg.dpo)
    root = Path(cfg.output_dir) / f"round-{k}"
    return dataclasses.replace(base, model=model, pairs=pairs, run_name="dpo", storage_path=str(root / "runs"),
                               data=dataclasses.replace(base.data, shards=None, val_shards=None))  # fmt: skip


def val_perplexity(model: str, val_shards: str, max_length: int = 2048, batch_size: int = 4) -> float:
    """exp(mean token loss) of ``model`` over a tokenized validation split, in this process."""
    import torch

    from chatmusician.data.manifest import shard_plan
    from chatmusician.model.loading import load_model
    from chatmusician.train.batching import as_numpy, collate, token_loss_sum
    from chatmusician.train.data_order import ShardRowReader, eval_pieces

    plan = shard_plan(val_shards)
    reader = ShardRowReader(plan["files"], plan["filesystem"], plan["chunks"], rank=0, world=1, micro_batch_size=1,
                            seed=0, window=1, shuffle=False, check_rows=False)  # fmt: skip
    table = reader.read(eval_pieces(plan["chunks"], 0, 1)[0])
    net = load_model(model, "fp32").eval()
    loss = tokens = 0.0
    with torch.no_grad():
        for begin in range(0, table.num_rows, batch_size):
            batch = collate(as_numpy(table.slice(begin, batch_size)), max_length)
            labels = batch.pop("labels")
            batch.pop("num_tokens")
            s, n = token_loss_sum(net(**batch).logits, labels)
            loss, tokens = loss + s, tokens + n
    return math.exp(min(loss / tokens, 50.0)) if tokens else float("nan")


def measure(cfg: RoundsConfig, k: int, model: str) -> dict[str, Any]:
    """The guards of ``model`` (its ABC quality through the evaluation's pool; perplexity when val_shards)."""
    from chatmusician.eval.config import AbcQualityConfig, EvalConfig, MMLUConfig, MTBConfig
    from chatmusician.eval.runner import evaluate

    p = cfg.prefs
    ecfg = EvalConfig(
        model=model, tokenizer=p.tokenizer, precision=p.precision, device=p.device, paper_figures=None,
        output_dir=str(Path(cfg.output_dir) / f"round-{k}" / "eval"), mtb=MTBConfig(enabled=False),
        mmlu=MMLUConfig(enabled=False), pool=p.pool,
        abc_quality=AbcQualityConfig(enabled=True, prompts=cfg.eval_prompts, n_per_prompt=cfg.eval_n_per_prompt,
                                     max_new_tokens=cfg.eval_max_new_tokens, check_midi=p.check_midi,
                                     train_tunes=p.train_tunes),
    )  # fmt: skip
    out = evaluate(ecfg)
    ppl = val_perplexity(model, cfg.val_shards) if cfg.val_shards else None
    return {"round": k, "model": model, **guards.guard_metrics(out["abc_quality"], ppl)}


def one_round(cfg: RoundsConfig, k: int, model: str, dpo=None) -> tuple[str, dict[str, Any]]:
    """prefs on ``model`` -> dpo -> merged model k; (its path, the round's prefs/dpo record)."""
    from chatmusician.model.merge import merge_adapter
    from chatmusician.prefs.job import build
    from chatmusician.train.dpo_recipe import trainer_for

    root = Path(cfg.output_dir) / f"round-{k}"
    prefs_cfg = dataclasses.replace(cfg.prefs, model=model, adapter=None, output_dir=str(root / "prefs"),
                                    seed=cfg.prefs.seed + k)  # fmt: skip
    meta = build(prefs_cfg)
    record = {"pairs": meta["pairs"], "reward_mean": meta["rewards"]["reward"].get("mean")}
    if not meta["pairs"]:
        raise RoundsStopped(
            f"round {k}: no preference pair (no prompt had a valid answer): see {root / 'prefs'}"
        )
    dcfg = dpo_config(cfg, k, model, prefs_cfg.output_dir, dpo)
    result = trainer_for(dcfg).fit()
    merged = root / "model"
    merge_adapter(Path(result.checkpoint.path) / "adapter", merged, base_model=model)
    return str(merged), record


def run_rounds(cfg: RoundsConfig, dpo=None) -> list[dict[str, Any]]:
    """Every round (Ray must be up); the table rows (round 0 first: ``{round, model, <guards>, status}``, later
    rounds also ``pairs`` and ``reward_mean``). ``dpo``: a DPOConfig for programmatic callers (default: the
    ``dpo`` YAML). Stops with :class:`RoundsStopped` on a guard, after writing the table and plot."""
    from chatmusician.model.merge import merge_adapter

    check_config(cfg, dpo)
    out = Path(cfg.output_dir)
    model = cfg.model
    if cfg.adapter:
        model = str(merge_adapter(cfg.adapter, out / "round-0" / "model", base_model=cfg.model))
    rows = [measure(cfg, 0, model) | {"status": "start"}]
    write(rows, out)
    for k in range(1, cfg.rounds + 1):
        model, record = one_round(cfg, k, model, dpo)
        row = measure(cfg, k, model) | record
        broken = guards.violations(rows[0], row, cfg.limits)
        row["status"] = "stopped: " + "; ".join(broken) if broken else "ok"
        rows.append(row)
        write(rows, out)
        print(
            f"[rounds] round {k}: " + json.dumps({g: row[g] for g in guards.GUARDS}),
            file=sys.stderr,
            flush=True,
        )
        if broken:
            raise RoundsStopped(
                f"round {k} worsened a guard past its limit: {'; '.join(broken)} (see {out / 'rounds.md'})"
            )
    return rows


def write(rows: list[dict[str, Any]], out: Path) -> None:
    guards.write_table(rows, out)
    guards.plot(rows, out / "rounds.png")
    (out / "rounds.json").write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")


def run(cfg: RoundsConfig) -> list[dict[str, Any]]:
    """CLI / ``ray job submit`` entry: the rounds on the cluster (``RAY_ADDRESS``) or a local Ray; a guard stop is
    one line and exit status 1 (the table and plot are written first)."""
    from chatmusician.ray_local import ray_session

    check_config(cfg)
    try:
        with ray_session():
            rows = run_rounds(cfg)
    except RoundsStopped as stop:  # not a bug: the guard did its job; the table and plot are written
        print(f"chatmusician rounds: stopped: {stop}", file=sys.stderr)
        raise SystemExit(1) from None
    print((Path(cfg.output_dir) / "rounds.md").read_text())
    return rows
