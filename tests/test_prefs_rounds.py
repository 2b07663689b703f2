"""Preference rounds: the guard stop rule (pure), the loop stopping on it with the table and plot written, the
validation perplexity guard, and two real rounds (prefs -> dpo -> merge -> evaluate) on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from chatmusician.eval.config import PoolConfig
from chatmusician.prefs import guards, rounds
from chatmusician.prefs.config import GuardLimits, PrefsConfig, RoundsConfig

BASE = {"strict_validity": 0.50, "bar_alignment_error": 0.010, "diversity": 0.80, "memorisation": 0.0,
        "val_perplexity": 10.0}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, []),
        ({"strict_validity": 0.45}, []),  # 5 points: at the limit, allowed
        ({"strict_validity": 0.44}, ["strict validity 0.500 -> 0.440 (may fall 0.05 at most)"]),
        ({"bar_alignment_error": 0.0468}, ["bar-alignment error 0.0100 -> 0.0468 (may rise 0.02 at most)"]),
        ({"diversity": 0.71}, ["diversity 0.800 -> 0.710 (must stay >= 0.9x round 0)"]),
        ({"memorisation": 0.05}, ["memorisation 0.000 -> 0.050 (may rise 0 at most)"]),
        ({"val_perplexity": 11.2}, ["validation perplexity 10.000 -> 11.200 (must stay <= 1.1x round 0)"]),
        ({"val_perplexity": None, "diversity": None}, []),  # not measured: not checked
        (
            {"strict_validity": 0.9, "diversity": 0.1, "val_perplexity": 5.0},
            ["diversity 0.800 -> 0.100 (must stay >= 0.9x round 0)"],
        ),
    ],
)
def test_stop_rule(change, expected):
    assert guards.violations(BASE, BASE | change, GuardLimits()) == expected


def test_strict_validity_needs_parse_play_aligned_bars_and_the_asked_key_and_meter():
    ok = {"parse_success": True, "midi_ok": True, "bar_alignment_error": 0.0, "key_as_requested": True}
    tunes = [ok, ok | {"bar_alignment_error": 0.1}, ok | {"meter_as_requested": False}, ok | {"midi_ok": False},
             {"parse_success": False}]  # fmt: skip
    got = guards.guard_metrics({"tunes_detail": tunes, "all": {"distinct_n": 0.7, "memorised": 0.0}}, 12.0)
    assert got == {"strict_validity": 0.2, "bar_alignment_error": None, "diversity": 0.7, "memorisation": 0.0,
                   "val_perplexity": 12.0}  # fmt: skip
    # the prefs job's strict reward is the same test, on its own rows (syntax_ok; parse_success = it and plays)
    from chatmusician.prefs.rewards import strictly_valid

    asked = {"key": "D", "meter": "4/4"}
    rows = [{k if k != "parse_success" else "syntax_ok": v for k, v in t.items()} for t in tunes]
    assert [strictly_valid(r, asked) for r in rows] == [guards.strictly_valid(t) for t in tunes]


def test_the_loop_stops_on_a_guard_with_the_table_and_plot_written(tmp_path, monkeypatch):
    measured = iter([BASE, BASE | {"val_perplexity": 10.5}, BASE | {"bar_alignment_error": 0.05}, BASE])
    ran = []
    monkeypatch.setattr(rounds, "check_config", lambda cfg, dpo: None)
    monkeypatch.setattr(
        rounds, "measure", lambda cfg, k, model: {"round": k, "model": model, **next(measured)}
    )
    monkeypatch.setattr(
        rounds, "one_round", lambda cfg, k, model, dpo: (ran.append(k) or f"m{k}", {"pairs": 3})
    )
    cfg = RoundsConfig(rounds=3, model="m0", output_dir=str(tmp_path))
    with pytest.raises(
        rounds.RoundsStopped, match=r"round 2 worsened a guard past its limit: bar-alignment error"
    ):
        rounds.run_rounds(cfg)
    assert ran == [1, 2]  # round 3 never starts
    table = (tmp_path / "rounds.md").read_text().splitlines()
    assert len(table) == 2 + 3 and table[3].split("|")[-2].strip() == "ok"
    assert "stopped: bar-alignment error 0.0100 -> 0.0500" in table[4]
    assert [r["round"] for r in json.loads((tmp_path / "rounds.json").read_text())] == [0, 1, 2]
    assert (tmp_path / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "rounds.csv").read_text().splitlines()[0].startswith("round,strict_validity,")


def write_val_shards(folder: Path, tokenizer_path: str) -> str:
    """Four tokenized tunes (labels = input_ids) and a manifest listing its row groups."""
    from chatmusician import corpora
    from chatmusician.model.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    ids = [tok(t)["input_ids"][:48] for t in corpora.nottingham_tunes()[:4]]
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": ids, "labels": ids}), folder / "part-00000.parquet")
    manifest = {"shards": [{"file": "part-00000.parquet", "rows": 4, "row_groups": [4]}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_validation_perplexity_is_exp_of_the_mean_token_loss(tiny_model_path, tmp_path):
    import torch

    from chatmusician.model.loading import load_model

    shards = write_val_shards(tmp_path / "val", tiny_model_path)
    rows = pq.read_table(Path(shards) / "part-00000.parquet")["input_ids"].to_pylist()
    model = load_model(tiny_model_path, "fp32").eval()
    total = count = 0.0
    with torch.no_grad():
        for r in rows:  # one row at a time, no padding: HF's own mean loss
            out = model(input_ids=torch.tensor([r]), labels=torch.tensor([r]))
            total, count = total + out.loss.item() * (len(r) - 1), count + len(r) - 1
    got = rounds.val_perplexity(tiny_model_path, shards, max_length=64, batch_size=3)
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)


def tie_breaker(text: str, request: dict) -> float:
    """A user reward in [0, 1] that tells equally scored tunes apart (test data only)."""
    return (len(text) % 11) / 10


@pytest.mark.integration
def test_two_rounds_on_the_tiny_model(ray_cluster, tiny_model_path, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"name": "reel", "family": "text_to_music",
                                    "fields": {"description": {"M": "4/4", "K": "D"}}, "request": {"key": "D"}},
                                   {"name": "waltz", "family": "text_to_music",
                                    "fields": {"description": {"M": "3/4", "K": "G"}}, "request": {"meter": "3/4"}}]))  # fmt: skip
    dpo = {"profile": "cpu", "zero_stage": 0, "num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": 2,
           "micro_batch_size": 1, "max_length": 128, "max_prompt_length": 48, "max_steps": 2, "lr": 5e-3,
           "lora": {"r": 4, "alpha": 8}, "checkpoint_every": 2, "keep_last": 1, "max_failures": 0}  # fmt: skip
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    cfg = RoundsConfig(
        rounds=2, model=tiny_model_path, output_dir=str(tmp_path / "out"), dpo=str(tmp_path / "dpo.yaml"),
        eval_prompts=str(prompts), eval_n_per_prompt=2, eval_max_new_tokens=24,
        val_shards=write_val_shards(tmp_path / "val", tiny_model_path),
        limits=GuardLimits(validity_drop=1, bar_alignment_rise=1, diversity_ratio=0, memorisation_rise=1,
                           perplexity_ratio=100),
        prefs=PrefsConfig(device="cpu", prompts=str(prompts), n_per_prompt=4, max_new_tokens=40, constrained=True,
                          pair_fraction=0.5, user_reward=f"{__name__}:tie_breaker",
                          pool=PoolConfig(use_ray=False, batch_size=8)),
    )  # fmt: skip
    rows = rounds.run_rounds(cfg)
    assert [r["round"] for r in rows] == [0, 1, 2] and [r["status"] for r in rows] == ["start", "ok", "ok"]
    assert all(r["pairs"] >= 1 for r in rows[1:]) and rows[0]["val_perplexity"] > 1
    # each round's model is a new one: the merged adapter moved the validation perplexity
    assert len({round(r["val_perplexity"], 6) for r in rows}) == 3
    out = tmp_path / "out"
    assert (out / "round-2" / "model" / "config.json").is_file() and (out / "rounds.png").is_file()
    assert len((out / "rounds.md").read_text().splitlines()) == 5
