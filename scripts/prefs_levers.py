"""One experiment over the quickstart's preference-round levers, offline, on a saved SFT model (issue 30).

Runs the quickstart's round (its RoundsConfig and DPOConfig defaults) with overrides, and prints one JSON row per
round: the guards (strict validity, bar-alignment error, diversity, memorisation, validation perplexity), the
pairs, the DPO run's last step and the wall times; ``--baseline`` measures the model itself (round 0).

    python scripts/prefs_levers.py --model outputs/quickstart/models/chatmusician-tiny --quickstart outputs/quickstart \
        --out scratch/levers/t04-strict --eval-n 8 --prefs-prompts 24 \
        --spec '{"prefs": {"temperature": 0.4, "chosen_strict": true}, "dpo": {"lr": 1e-4}}'

``--spec`` keys: ``prefs`` / ``dpo`` (nested field overrides of the quickstart's ``rounds.prefs`` / ``dpo``),
``rounds`` (K; 0 with ``--baseline``: measure only), ``pairs_from`` (a prefs folder reused in round 1 instead of
sampling: the DPO levers alone).
The guard evaluation uses the quickstart's 8 requests (``--eval-prompts`` of them) with ``--eval-n`` tunes each;
the prefs requests are ``--prefs-prompts`` other tunes' descriptions of the same corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path


def replaced(obj, overrides: dict):
    """``obj`` (a dataclass) with nested ``overrides``."""
    for key, value in overrides.items():
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = replaced(current, value)
        obj = dataclasses.replace(obj, **{key: value})
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the SFT model (merged) the round starts from")
    ap.add_argument(
        "--quickstart", required=True, help="the quickstart's out_dir (data/pt.jsonl, shards/sft/val)"
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--spec", default="{}")
    ap.add_argument("--eval-n", type=int, default=8, help="guard tunes per request")
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--prefs-prompts", type=int, default=8)
    ap.add_argument("--baseline", action="store_true", help="measure round 0 (the model itself) first")
    args = ap.parse_args()

    from chatmusician.corpora import nottingham_tunes
    from chatmusician.prefs import rounds
    from chatmusician.quickstart.config import QuickstartConfig
    from chatmusician.quickstart.preference import prompts_file
    from chatmusician.ray_local import init_local

    spec = json.loads(args.spec)
    cfg = QuickstartConfig()
    out, qs = Path(args.out), Path(args.quickstart)
    shutil.rmtree(out, ignore_errors=True)
    tunes = nottingham_tunes()[: cfg.max_tunes]
    eval_prompts = prompts_file(tunes, args.eval_prompts, out / "eval_prompts.json")
    prefs_prompts = prompts_file(tunes, args.prefs_prompts, out / "prefs_prompts.json")
    rc = dataclasses.replace(
        cfg.rounds, rounds=spec.get("rounds", 1), model=args.model, output_dir=str(out),
        eval_prompts=str(eval_prompts), val_shards=str(qs / "shards" / "sft" / "val"), eval_n_per_prompt=args.eval_n,
        prefs=dataclasses.replace(cfg.rounds.prefs, prompts=str(prefs_prompts), train_tunes=str(qs / "data" / "pt.jsonl")),
    )  # fmt: skip
    rc = replaced(rc, {"prefs": spec.get("prefs", {})})
    dpo = replaced(dataclasses.replace(cfg.dpo, max_length=cfg.max_len), spec.get("dpo", {}))
    init_local(num_cpus=cfg.num_cpus)
    rows, model = [], rc.model
    if args.baseline:
        started = time.time()
        rows.append(rounds.measure(rc, 0, model) | {"t_eval": time.time() - started})
        print("ROW", json.dumps(rows[-1], default=str), flush=True)
    for k in range(1, rc.rounds + 1):
        started = time.time()
        if spec.get("pairs_from") and k == 1:
            from chatmusician.model.merge import merge_adapter
            from chatmusician.train.dpo_recipe import trainer_for

            root = out / f"round-{k}"
            shutil.copytree(spec["pairs_from"], root / "prefs")
            meta = json.loads((root / "prefs" / "manifest.json").read_text())
            record = {"pairs": meta["pairs"], "reward_mean": meta["rewards"]["reward"].get("mean")}
            result = trainer_for(rounds.dpo_config(rc, k, model, str(root / "prefs"), dpo)).fit()
            model = str(
                merge_adapter(Path(result.checkpoint.path) / "adapter", root / "model", base_model=model)
            )
        else:
            model, record = rounds.one_round(rc, k, model, dpo)
        trained = time.time()
        row = (
            rounds.measure(rc, k, model)
            | record
            | {"t_round": trained - started, "t_eval": time.time() - trained}
        )
        steps = [json.loads(line) for line in open(out / f"round-{k}" / "runs" / "dpo" / "metrics.jsonl")]
        keys = ("loss", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected", "kl_estimate")
        row["dpo_last"] = {key: steps[-1].get(key) for key in keys}
        rows.append(row)
        print("ROW", json.dumps(row, default=str), flush=True)
    (out / "rows.json").write_text(json.dumps({"spec": spec, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
