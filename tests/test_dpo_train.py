"""Preference training: pair tokenization and the one-pass batch (unit), the reference as the adapter-disabled
model (unit, peft), and ``chatmusician dpo`` on the shared local Ray: 2 CPU workers, ZeRO-2, LoRA on the tiny
LLaMA, pairs of a real Nottingham tune (chosen) against a scrambled one (rejected). The first step's loss is
exactly log 2 (the LoRA update starts at zero: policy = reference); a run that loses a worker at step 3 resumes
from checkpoint 2 to the uninterrupted run's losses and metrics."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatmusician import corpora
from chatmusician.prompts import build_chat_prompt
from chatmusician.train.config import DataConfig, DPOConfig, LoraConfig

PROMPT = build_chat_prompt("Compose a reel in ABC notation.")


def scrambled(tune: str) -> str:
    """The tune's header with its bars reversed and every other note dropped: plausible tokens, bad music."""
    head, _, body = tune.partition("K:")
    key, _, notes = body.partition("\n")
    return f"{head}K:{key}\n" + "|".join(bar[::2] for bar in reversed(notes.split("|")))


def write_pairs(path: Path, n: int = 16) -> Path:
    tunes = corpora.nottingham_tunes()[:n]
    rows = [{"prompt": PROMPT, "chosen": t.strip(), "rejected": scrambled(t.strip())} for t in tunes]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_pairs_become_one_batch_with_prompts_masked(tiny_model_path, tmp_path):
    from chatmusician.model.loading import load_tokenizer
    from chatmusician.train.dpo_data import collate_pairs, read_pairs, tokenize_pairs

    tok = load_tokenizer(tiny_model_path)
    pairs = read_pairs(str(write_pairs(tmp_path / "pairs.parquet", 2)))
    table = tokenize_pairs(pairs, tok, max_length=96, max_prompt_length=32)
    batch = collate_pairs({c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}, 96)
    prompt_len = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == 4  # [chosen_0, chosen_1, rejected_0, rejected_1]
    assert (ids[0, :prompt_len] == ids[2, :prompt_len]).all()  # one prompt, two answers
    assert (labels[:, :prompt_len] == -100).all() and (labels[:, prompt_len] != -100).all()
    chosen_answer = tok.decode([t for t in labels[0].tolist() if t != -100], skip_special_tokens=True)
    assert chosen_answer.startswith(pairs["chosen"][0][:20])
    assert batch["num_tokens"] == sum(
        len(r) for c in ("chosen", "rejected") for r in table[f"{c}_input_ids"].to_pylist()
    )


def test_reference_is_the_base_model_with_the_adapter_disabled(tiny_model_path, tmp_path):
    import torch

    from chatmusician.model.loading import load_model, load_tokenizer
    from chatmusician.model.lora import apply_lora
    from chatmusician.train.config import DPOConfig
    from chatmusician.train.dpo_data import collate_pairs, read_pairs, tokenize_pairs
    from chatmusician.train.dpo_loss import sequence_logps
    from chatmusician.train.dpo_trainer import micro_batch_pair_loss, reference_mode

    tok = load_tokenizer(tiny_model_path)
    table = tokenize_pairs(read_pairs(str(write_pairs(tmp_path / "p.parquet", 2))), tok, 96, 32)
    batch = collate_pairs({c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}, 96)
    batch.pop("num_tokens")
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    base = load_model(tiny_model_path, "fp32").eval()
    with torch.no_grad():
        expected, _ = sequence_logps(base(**inputs).logits, batch["labels"])
    torch.manual_seed(0)
    policy = apply_lora(load_model(tiny_model_path, "fp32"), LoraConfig(r=4, alpha=8, dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # the adapter now changes the model
        moved, counts = sequence_logps(policy(**inputs).logits, batch["labels"])
        with reference_mode(policy):
            ref, _ = sequence_logps(policy(**inputs).logits, batch["labels"])
    assert torch.allclose(ref, expected, atol=1e-5) and (moved - expected).abs().max() > 1e-2
    cfg = DPOConfig(loss="sigmoid", beta=0.1)
    loss, stats = micro_batch_pair_loss(policy, batch, cfg)
    margin = 0.1 * ((moved[:2] - expected[:2]) - (moved[2:] - expected[2:]))
    assert loss.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(margin).mean()), abs=1e-5)
    assert float(stats[1]) == pytest.approx(float(margin.sum()), abs=1e-5) and float(stats[-1]) == 2
    with_nll, _ = micro_batch_pair_loss(policy, batch, replace(cfg, sft_weight=0.5))
    nll = -moved[:2].sum() / counts[:2].sum()  # the chosen answers' NLL per token (RPO)
    assert with_nll.item() == pytest.approx(loss.item() + 0.5 * float(nll), abs=1e-5) and float(nll) > 1


def test_bad_dpo_settings_are_one_line_errors(tiny_model_path, tmp_path, capsys):
    from chatmusician.cli import main

    pairs = write_pairs(tmp_path / "p.parquet", 2)
    for args, expected in [
        (["--loss", "kto"], "loss must be one of ('sigmoid', 'dpop', 'ipo')"),
        (["--beta", "0"], "beta must be > 0, dpop_lambda and sft_weight >= 0"),
        (["--pairs", str(tmp_path / "nowhere")], "pairs: no"),
    ]:
        code = main(["dpo", "--model", tiny_model_path, "--pairs", str(pairs), "--profile", "cpu",
                     "--num_workers", "1", "--global_batch_size", "1", "--max_length", "64",
                     "--max_prompt_length", "32", "--storage_path", str(tmp_path / "runs"), *args])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], err


# --- the recipe on Ray ---------------------------------------------------------------------------------------


STEPS = 4


@pytest.fixture(scope="module")
def dpo_base(tiny_model_path, tmp_path_factory) -> DPOConfig:
    root = tmp_path_factory.mktemp("dpo")
    return DPOConfig(
        run_name="dpo-ref", storage_path=str(root / "runs"), model=tiny_model_path, pairs=str(write_pairs(root / "pairs.parquet")),
        loss="dpop", beta=0.1, dpop_lambda=10.0, lora=LoraConfig(r=8, alpha=16), data=DataConfig(shuffle=True),
        profile="cpu", zero_stage=2, num_workers=2, cpus_per_worker=0.5, global_batch_size=8, micro_batch_size=2,
        max_length=160, max_prompt_length=32, max_steps=STEPS, lr=5e-3, warmup_ratio=0.0, checkpoint_every=2,
        keep_last=2, max_failures=0, log_every=100,
    )  # fmt: skip


def logged(cfg: DPOConfig) -> list[dict]:
    path = Path(cfg.storage_path) / cfg.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_dpo_trains_from_log2_and_resumes_exactly_after_a_lost_worker(ray_cluster, dpo_base):
    from chatmusician.train.dpo_recipe import train

    train(dpo_base)
    reference = {m["step"]: m for m in logged(dpo_base)}
    assert sorted(reference) == list(range(1, STEPS + 1))
    first = reference[1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: every ratio is 0
    assert first["reward_margin"] == pytest.approx(0, abs=1e-6) and first["kl_estimate"] == pytest.approx(
        0, abs=1e-6
    )
    assert first["logp_chosen"] < 0 and first["logp_rejected"] < 0 and first["pairs"] == 8
    last = reference[STEPS]
    assert last["reward_margin"] > 0.05 and last["loss"] < first["loss"]  # it learns the preference
    adapter = Path(dpo_base.storage_path) / dpo_base.run_name / f"checkpoint_{STEPS:07d}" / "adapter"
    assert (adapter / "adapter_config.json").is_file()

    cfg = replace(dpo_base, run_name="dpo-fault", fail_at_step=3, max_failures=1)
    train(cfg)
    run_dir = Path(cfg.storage_path) / cfg.run_name
    assert (run_dir / ".failed_at_step_3").exists()
    resumed = logged(cfg)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]  # the restart from checkpoint 2 runs 3 and 4 once
    for m in resumed:
        ref = reference[m["step"]]
        for key in (
            "loss",
            "reward_margin",
            "reward_accuracy",
            "logp_chosen",
            "logp_rejected",
            "kl_estimate",
        ):
            assert m[key] == pytest.approx(ref[key], abs=1e-6), (m["step"], key)


@pytest.mark.integration
def test_full_training_reads_reference_logps_precomputed_with_the_starting_model(ray_cluster, dpo_base):
    """No adapter to disable: the driver computes the starting model's log-probs once, into the pair shards; at
    step 1 the policy is that model, so every ratio is 0 again (up to the batch's padding: fp32 round-off)."""
    import pyarrow.parquet as pq

    from chatmusician.train.dpo_recipe import train

    cfg = replace(dpo_base, run_name="dpo-full", train_type="full", zero_stage=0, num_workers=1, micro_batch_size=2,
                  global_batch_size=4, max_steps=2, loss="sigmoid", lr=1e-3)  # fmt: skip
    train(cfg)
    shards = Path(cfg.storage_path) / cfg.run_name / "pairs_tokenized"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["reference"].startswith("precomputed")
    ref = pq.read_table(shards / "part-00000.parquet", columns=["ref_chosen_logp", "ref_rejected_logp"])
    assert ref.num_rows == 16 and all(v < 0 for v in ref["ref_chosen_logp"].to_pylist())
    steps = {m["step"]: m for m in logged(cfg)}
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[1]["kl_estimate"] == pytest.approx(0, abs=1e-3) and steps[2]["kl_estimate"] != 0
    assert (Path(cfg.storage_path) / cfg.run_name / "checkpoint_0000002" / "model").is_dir()


@pytest.mark.integration
def test_zero3_partitions_the_model_and_the_disabled_adapter_is_still_the_reference(ray_cluster, dpo_base):
    from chatmusician.train.dpo_recipe import train

    cfg = replace(dpo_base, run_name="dpo-zero3", zero_stage=3, max_steps=2, checkpoint_every=2)
    train(cfg)
    steps = {m["step"]: m for m in logged(cfg)}
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[2]["kl_estimate"] != 0 and steps[2]["reward_margin"] > 0
