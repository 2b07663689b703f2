"""Preference data: the music rewards on real tunes (abc2midi through the renderer's judge), the pairing rule,
user rewards, near-copies never chosen, the job's files (single-process pool on the tiny model: answers do not
depend on batching), and one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from chatmusician import corpora
from chatmusician.eval import abc_quality
from chatmusician.eval.config import PoolConfig
from chatmusician.prefs import pairs as pairing
from chatmusician.prefs import rewards
from chatmusician.prefs.config import PrefsConfig, RewardWeights
from chatmusician.prefs.job import score_samples

REEL = "X:1\nT:Test reel\nM:4/4\nL:1/8\nK:D\n|:DFAF DFAF|GBdB GBdB|AFdF AFdF|1 EFGE D4:|2 EFGE D4|]\n"
BROKEN_BARS = "X:1\nT:Broken\nM:4/4\nL:1/8\nK:D\nDFAF DFA|GBdB GBdB G|AFdF AFdF|EFGE D4|]\n"


def metrics(text: str, request: dict) -> dict:
    return abc_quality.tune_metrics(text, request, abc_quality.midi_check(text))


def test_rewards_of_a_good_tune_a_misaligned_one_and_text():
    asked = {"key": "D", "meter": "4/4", "unit_length": "1/8"}
    good = rewards.components(metrics(REEL, asked), asked)
    assert good == {"parses": 1.0, "plays": 1.0, "bar_alignment": 1.0, "as_requested": 1.0,
                    "structure": pytest.approx(0.5 + 0.5 * 0.0), "novelty": 1.0, "strict": 1.0}  # fmt: skip
    other = rewards.components(
        metrics(REEL, {"key": "G", "meter": "4/4", "bars": 12}), {"key": "G", "meter": "4/4", "bars": 12}
    )
    assert other["as_requested"] == pytest.approx(1 / 3)  # meter yes; key no; 5 bars is not 12 +- 1
    assert other["strict"] == 0.0  # not the asked key
    bad = metrics(BROKEN_BARS, asked)
    # 1 of 4 checked bars wrong: the 9/8 second bar (the short first bar is a pickup, tolerated)
    assert rewards.components(bad, asked)["bar_alignment"] == pytest.approx(0.75)
    assert rewards.components(bad, asked)["strict"] == 0.0  # a bar off its meter
    # chosen_strict: only a strictly valid tune may be chosen (the misaligned one still parses and plays)
    assert rewards.score(bad, asked, RewardWeights())["valid"]
    assert not rewards.score(bad, asked, RewardWeights(), chosen_strict=True)["valid"]
    assert rewards.score(metrics(REEL, asked), asked, RewardWeights(), chosen_strict=True)["valid"]
    assert rewards.components(metrics("I cannot write music.", asked), asked) == dict.fromkeys(
        rewards.REWARDS, 0.0
    )
    w = RewardWeights(structure=0.0, novelty=0.0)
    assert rewards.total(good, w) == 1.0 and rewards.total(good, w, user=0.0) == pytest.approx(0.8)


def test_pairs_top_valid_against_bottom_strictly_better_only():
    s = [{"reward": r, "valid": v} for r, v in [(0.9, False), (0.8, True), (0.7, True), (0.2, True), (0.1, False),
                                                (0.5, True), (0.5, True), (0.4, True), (0.3, True), (0.6, True)]]  # fmt: skip
    assert pairing.pair_prompt(s, 0.1) == [(1, 4)]  # best valid (not the invalid 0.9) vs the worst
    assert pairing.pair_prompt(s, 0.2) == [(1, 4), (2, 3)]
    ties = [{"reward": 0.5, "valid": True}] * 4
    assert pairing.pair_prompt(ties, 0.5) == []  # no preference to learn
    none_valid = [{"reward": 0.5, "valid": False}, {"reward": 0.1, "valid": False}]
    rows = [{"name": "a", "prompt": "P", "text": f"t{i}", **x, "reward_parses": 1.0} for i, x in enumerate(s)]
    rows += [{"name": "b", "prompt": "Q", "text": f"u{i}", **x} for i, x in enumerate(none_valid)]
    pairs, empty = pairing.make_pairs(rows, 0.1)
    assert empty == ["b"] and len(pairs) == 1
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == (
        "P",
        "t1",
        "t4",
    )
    assert (
        pairs[0]["chosen_reward"] == 0.8
        and pairs[0]["rejected_reward"] == 0.1
        and pairs[0]["chosen_reward_parses"] == 1.0
    )
    with pytest.raises(ValueError, match="pair_fraction"):
        pairing.make_pairs(rows, 0.7)
    # chosen_constrained: constrained answers (role chosen) only chosen, free ones (role rejected) only rejected.
    roles = [{"reward": r, "valid": True, "role": role} for r, role in
             [(0.9, "rejected"), (0.3, "rejected"), (0.8, "chosen"), (0.2, "chosen")]]  # fmt: skip
    assert pairing.pair_prompt(roles, 0.5) == [(2, 1)]  # not the best free one, not the worst constrained one


def good_user_reward(text: str, request: dict) -> float:
    return 1.0 if "|:" in text else 0.0


def bad_user_reward(text: str, request: dict) -> float:
    return 3.0


def test_near_copies_are_never_chosen_and_the_user_reward_joins(tmp_path):
    tune = corpora.nottingham_tunes()[5].strip()
    (tmp_path / "train.abc").write_text(tune + "\n")
    cfg = PrefsConfig(train_tunes=str(tmp_path / "train.abc"), user_reward=f"{__name__}:good_user_reward",
                      check_midi=True)  # fmt: skip
    prompts = [{"name": "p", "family": "text_to_music", "prompt": "Compose.", "request": {}}]
    answers = [{"name": "p", "sample": 0, "text": tune, "tokens": 1},  # a copy: scores high, never chosen
               {"name": "p", "sample": 1, "text": REEL, "tokens": 1},
               {"name": "p", "sample": 2, "text": "no music", "tokens": 1}]  # fmt: skip
    rows = score_samples(cfg, prompts, answers)
    assert [r["valid"] for r in rows] == [False, True, False] and rows[0]["memorised"]
    assert rows[1]["reward_user"] == 1.0 and rows[2]["midi_ok"] is False
    pairs, _ = pairing.make_pairs(rows, 0.34)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(REEL, "no music")]
    with pytest.raises(rewards.RewardError, match=r"must return a number in \[0, 1\], returned 3.0"):
        rewards.user_score(bad_user_reward, REEL, {}, "x:bad")


def test_prefs_job_files_and_answers_independent_of_batching(tiny_model_path, tmp_path):
    from chatmusician.prefs.job import build

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"name": "reel", "family": "text_to_music",
                                    "fields": {"description": {"M": "4/4", "K": "D"}}, "request": {"key": "D"}},
                                   {"name": "jig", "family": "form", "fields": {"form": "AABB"}}]))  # fmt: skip
    cfg = PrefsConfig(model=tiny_model_path, device="cpu", prompts=str(prompts), n_per_prompt=4, max_new_tokens=24,
                      pair_fraction=0.25, check_midi=False, output_dir=str(tmp_path / "a"),
                      pool=PoolConfig(use_ray=False, batch_size=8))  # fmt: skip
    meta = build(cfg)
    samples = pq.read_table(tmp_path / "a" / "samples.parquet").to_pylist()
    assert len(samples) == meta["samples"] == 8 and meta["prompts"] == 2
    pairs = pq.read_table(tmp_path / "a" / "pairs.parquet")
    assert (
        pairs.column_names[:4] == ["name", "prompt", "chosen", "rejected"] and pairs.num_rows == meta["pairs"]
    )
    assert meta["rewards"]["reward"]["count"] == 8 and 0 <= meta["rewards"]["reward"]["min"] <= 1
    assert sorted(meta["prompts_without_pair"] + sorted(set(pairs["name"].to_pylist()))) == ["jig", "reel"]
    assert all(s["prompt"].startswith("Human: ") and s["prompt"].endswith("Assistant: ") for s in samples)
    # The web UI's votes join the scored pairs as they are (a line a crash cut short is counted and skipped).
    from chatmusician.serve.votes import append_vote, vote_record

    votes = tmp_path / "votes.jsonl"
    append_vote(votes, vote_record("Human: a jig </s> Assistant: ", "X:1\nK:G\nGAB|", "la la", "m"), 10_000)
    with votes.open("a") as f:
        f.write('{"prompt": "cut')
    again = build(
        replace(
            cfg,
            output_dir=str(tmp_path / "b"),
            pool=PoolConfig(use_ray=False, batch_size=1),
            votes=str(votes),
        )
    )
    assert again["rewards"] == meta["rewards"]
    assert pq.read_table(tmp_path / "b" / "samples.parquet")["text"].to_pylist() == [
        s["text"] for s in samples
    ]
    both = pq.read_table(tmp_path / "b" / "pairs.parquet").to_pylist()
    assert again["votes"] == {"pairs": 1, "skipped_lines": 1} and again["pairs"] == meta["pairs"] + 1
    assert [(r["source"], r["chosen"]) for r in both if r["source"] == "web-ui"] == [
        ("web-ui", "X:1\nK:G\nGAB|")
    ]
    assert [r["chosen"] for r in both if r["source"] == "rewards"] == pairs["chosen"].to_pylist()


def one_request_run(tmp_path, model: str, name: str, description: dict, request: dict, **options):
    """(config, samples, pairs) of a prefs run on the transformers loop for one request, with ``options``."""
    from chatmusician.prefs.job import build

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"name": name, "family": "text_to_music", "fields": {"description": description},
                                    "request": request}]))  # fmt: skip
    cfg = PrefsConfig(model=model, device="cpu", prompts=str(prompts), pair_fraction=0.5, check_midi=False,
                      output_dir=str(tmp_path / "out"), pool=PoolConfig(use_ray=False, batch_size=8),
                      **options)  # fmt: skip
    build(cfg)
    out = tmp_path / "out"
    return (
        cfg,
        pq.read_table(out / "samples.parquet").to_pylist(),
        pq.read_table(out / "pairs.parquet").to_pylist(),
    )


def test_chosen_answers_are_constrained_to_the_request_and_rejected_ones_free(tiny_model_path, tmp_path):
    """chosen_constrained: each prompt also gets n answers through constrained decoding with its request's key
    and meter; every pair chooses one of those (it parses, in the asked key and meter, every bar full) and
    rejects a free one."""
    cfg, samples, pairs = one_request_run(tmp_path, tiny_model_path, "reel", {"M": "4/4", "K": "D"},
                                          {"key": "D", "meter": "4/4"}, n_per_prompt=4, max_new_tokens=64,
                                          chosen_constrained=True)  # fmt: skip
    assert sorted(s["sample"] for s in samples) == list(range(8))
    constrained = {s["text"] for s in samples if s["role"] == "chosen"}
    assert {s["sample"] for s in samples if s["role"] == "chosen"} == {4, 5, 6, 7}
    for text in constrained:  # judged by the validator, not by the decoder that wrote it
        m = abc_quality.tune_metrics(text, {"key": "D", "meter": "4/4"})
        assert m["syntax_ok"] and m["key_as_requested"] and m["meter_as_requested"], (text, m)
        assert m["bar_alignment_error"] == 0.0, (text, m)
    assert pairs and all(p["chosen"] in constrained and p["rejected"] not in constrained for p in pairs)
    with pytest.raises(ValueError, match="chosen_header false"):
        from chatmusician.prefs.vllm_pool import check

        check(replace(cfg, engine="vllm", pool=PoolConfig(use_ray=True)))


def test_chosen_answers_start_with_the_asked_header_and_rejected_ones_are_free(tiny_model_path, tmp_path):
    """chosen_header: each prompt also gets n answers that start with the asked meter, unit length (1/8 when
    none is described) and key, the model writing the rest; pairs choose only those and reject free ones."""
    from chatmusician.prefs.job import check_config

    cfg, samples, pairs = one_request_run(tmp_path, tiny_model_path, "jig", {"Meter": "6/8", "Key": "G"},
                                          {"key": "G", "meter": "6/8"}, n_per_prompt=3, max_new_tokens=48,
                                          chosen_header=True)  # fmt: skip
    chosen = [s for s in samples if s["role"] == "chosen"]
    header = "X:1\nM:6/8\nL:1/8\nK:G\n"
    assert sorted(s["sample"] for s in chosen) == [3, 4, 5] and len({s["text"] for s in chosen}) == 3
    assert all(s["text"].startswith(header) and len(s["text"]) > len(header) for s in chosen)
    assert not any(s["text"].startswith(header) for s in samples if s["role"] == "rejected")
    for s in chosen:  # the validator reads the header it was given
        m = abc_quality.tune_metrics(s["text"], {"key": "G", "meter": "6/8"})
        assert m["key_as_requested"] and m["meter_as_requested"], (s["text"], m)
    assert all(p["chosen"].startswith(header) and not p["rejected"].startswith(header) for p in pairs)
    with pytest.raises(ValueError, match="set one"):
        check_config(replace(cfg, chosen_constrained=True))


def test_bad_prefs_settings_are_one_line_errors(tiny_model_path, capsys):
    from chatmusician.cli import main

    for args, expected in [
        (["--pair_fraction", "0.9"], "pair_fraction must be in (0, 0.5]"),
        (["--n_per_prompt", "1"], "n_per_prompt must be at least 2"),
        (["--user_reward", "nowhere.module:fn"], "user_reward 'nowhere.module:fn' cannot be imported"),
        (["--weights.parses", "-1"], "weights must be >= 0"),
    ]:
        code = main(["prefs", "--model", tiny_model_path, *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], err


def _vllm_missing() -> str | None:
    from pathlib import Path

    from chatmusician.serve.app import vllm_python

    python = vllm_python(".venv-vllm/bin/python")
    return None if Path(python).exists() else f"no vLLM environment at {python}"


@pytest.mark.integration
@pytest.mark.skipif(_vllm_missing() is not None, reason="the vLLM environment (.venv-vllm) is not built here")
def test_vllm_engine_samples_every_item_from_its_own_seed(ray_cluster, tiny_model_path, tmp_path):
    from chatmusician.prefs.job import build

    cfg = PrefsConfig(model=tiny_model_path, n_per_prompt=3, max_new_tokens=24, engine="vllm", check_midi=False,
                      prompts=None, output_dir=str(tmp_path / "a"), pool=PoolConfig(num_cpus=0.5, batch_size=30))  # fmt: skip
    meta = build(cfg)
    texts = pq.read_table(tmp_path / "a" / "samples.parquet")["text"].to_pylist()
    assert meta["samples"] == 30 and len(set(texts)) > 20  # 10 prompts x 3 seeds: different answers
    build(replace(cfg, output_dir=str(tmp_path / "b"), pool=PoolConfig(num_cpus=0.5, batch_size=4)))
    assert (
        pq.read_table(tmp_path / "b" / "samples.parquet")["text"].to_pylist() == texts
    )  # batching changes nothing
    with pytest.raises(ValueError, match="engine vllm samples a merged model"):
        build(replace(cfg, constrained=True))
