"""Training logic without Ray: schedule, DeepSpeed configs per profile, placement, batching, configs, CLI."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from chatmusician.config import load_config
from chatmusician.train.batching import collate, step_seed
from chatmusician.train.config import PretrainConfig, SFTConfig, TrainConfig, TrainConfigError
from chatmusician.train.deepspeed_config import (
    BatchSizeError,
    build_deepspeed_config,
    gradient_accumulation_steps,
)
from chatmusician.train.placement import scaling_config
from chatmusician.train.profiles import ProfileError, get_profile, mfu, peak_flops_for
from chatmusician.train.recipe import total_steps_for, validate
from chatmusician.train.schedule import lr_at, lr_multiplier, warmup_steps

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- schedule: 5 % warmup, then cosine


def test_schedule_is_five_percent_linear_warmup_then_cosine_to_min():
    total, peak, floor = 200, 1e-4, 1e-5
    lrs = [lr_at(s, total, peak, 0.05, floor) for s in range(total)]
    assert warmup_steps(total, 0.05) == 10
    # Linear warmup: 1/10, 2/10, ... of the peak, reaching it on the 10th step.
    assert lrs[:10] == pytest.approx([peak * (i + 1) / 10 for i in range(10)])
    # Cosine: starts at the peak, halfway down at the middle of the decay, min_lr on the last step.
    assert lrs[10] == pytest.approx(peak)
    mid = 10 + (total - 1 - 10) / 2
    assert lr_at(int(mid), total, peak, 0.05, floor) == pytest.approx(
        floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (int(mid) - 10) / (total - 11)))
    )
    assert lrs[-1] == pytest.approx(floor)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert max(lrs) == pytest.approx(peak)


def test_schedule_drives_torch_lambda_lr_the_way_deepspeed_steps_it():
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    total, peak = 40, 3e-4
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = LambdaLR(opt, lr_multiplier(total, peak, 0.05))
    seen = []
    for _ in range(total):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, total, peak, 0.05) for s in range(total)])
    assert seen[0] == pytest.approx(peak / 2)  # ceil(0.05 * 40) = 2 warmup steps


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_schedule_rejects_impossible_warmup(ratio):
    with pytest.raises(ValueError, match="warmup_ratio"):
        lr_at(0, 10, 1e-4, ratio)


# ---------------------------------------------------------------- DeepSpeed configs per hardware profile


def _deepspeed_reads(config: dict):
    """DeepSpeed's own parser of the config dict (world size 1: no process group here)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(config)


def test_v100_profile_is_fp16_with_dynamic_loss_scaling_and_no_bf16():
    cfg = load_config(SFTConfig, ROOT / "configs" / "sft.yaml", num_workers=1)
    ds = build_deepspeed_config(cfg, world_size=1)
    parsed = _deepspeed_reads(ds)
    assert parsed.float16_config.enabled and not parsed.bfloat16_config.enabled
    assert parsed.float16_config.loss_scale == 0  # 0 = dynamic
    assert parsed.float16_config.initial_scale_power == 16
    assert parsed.zero_optimization_stage == 2
    assert parsed.gradient_clipping == 1.0
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (8, 8)


def test_a800_profile_is_bf16_without_loss_scaling():
    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain.yaml", num_workers=1)
    parsed = _deepspeed_reads(build_deepspeed_config(cfg, world_size=1))
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.zero_optimization_stage == 2
    assert get_profile("a800").fused_optimizer


def test_cpu_profile_is_fp32_and_every_zero_stage():
    for stage in (0, 1, 2, 3):
        ds = build_deepspeed_config(TrainConfig(profile="cpu", zero_stage=stage), world_size=8)
        assert ds["zero_optimization"]["stage"] == stage
        assert not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
        assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW, no compiled CPU Adam
    assert get_profile("cpu").backend == "gloo"


def test_profile_mismatches_are_clear_errors():
    with pytest.raises(ProfileError, match="stages"):
        build_deepspeed_config(TrainConfig(profile="a800", zero_stage=0), world_size=8)
    with pytest.raises(ProfileError, match="unknown hardware profile 'tpu'"):
        get_profile("tpu")


def test_gradient_accumulation_fills_the_global_batch():
    assert gradient_accumulation_steps(8, 1, 8) == 1
    assert gradient_accumulation_steps(8, 2, 2) == 2
    assert gradient_accumulation_steps(64, 1, 8) == 8
    with pytest.raises(BatchSizeError, match="not a multiple of micro_batch_size 2 x 3 workers"):
        gradient_accumulation_steps(8, 2, 3)


# ---------------------------------------------------------------- placement


def test_pretraining_asks_for_a800_nodes_and_sft_for_v100_nodes():
    pre = scaling_config(load_config(PretrainConfig, ROOT / "configs" / "pretrain.yaml"))
    sft = scaling_config(load_config(SFTConfig, ROOT / "configs" / "sft.yaml"))
    assert pre._resources_per_worker_not_none["accelerator_type:A800"] > 0
    assert "accelerator_type:V100" not in pre._resources_per_worker_not_none
    assert sft._resources_per_worker_not_none["accelerator_type:V100"] > 0
    assert pre.use_gpu and sft.use_gpu and pre._resources_per_worker_not_none["GPU"] == 1
    cpu = scaling_config(TrainConfig(profile="cpu", num_workers=2))
    assert not cpu.use_gpu and cpu._resources_per_worker_not_none == {"CPU": 0.5}
    anywhere = scaling_config(TrainConfig(profile="a800", accelerator_type=""))
    assert not any(k.startswith("accelerator_type") for k in anywhere._resources_per_worker_not_none)


# ---------------------------------------------------------------- configs carry the original's defaults


@pytest.mark.parametrize(
    ("cls", "name", "profile"), [(PretrainConfig, "pretrain", "a800"), (SFTConfig, "sft", "v100")]
)
def test_yaml_configs_carry_the_originals_defaults(cls, name, profile):
    cfg = load_config(cls, ROOT / "configs" / f"{name}.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    assert set(cfg.lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert cfg.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert (cfg.lr, tuple(cfg.betas), cfg.weight_decay) == (1e-4, (0.9, 0.95), 0.1)
    assert (cfg.warmup_ratio, cfg.grad_clip, cfg.global_batch_size, cfg.max_length) == (0.05, 1.0, 8, 2048)
    assert (cfg.zero_stage, cfg.profile, cfg.train_type) == (2, profile, "lora")
    if name == "sft":  # the paper's "two epoch fine-tuning" and the original train.sh's NUM_EPOCHS=2
        assert cfg.epochs == 2
    # The dataclass defaults agree with the YAML, so a bare `chatmusician pretrain` trains the same way.
    assert cls().lora == cfg.lora and cls().profile == profile


def test_tiny_config_is_a_valid_cpu_run():
    cfg = load_config(TrainConfig, ROOT / "configs" / "train_tiny.yaml")
    validate(cfg)
    assert cfg.profile == "cpu" and cfg.num_workers == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train_type": "qlora"}, "train_type"),
        ({"global_batch_size": 6, "micro_batch_size": 4}, "not a multiple"),
        ({"max_steps": 0}, "max_steps"),
        ({"profile": "v100", "zero_stage": 1}, "stages"),
    ],
)
def test_invalid_train_configs_fail_before_any_worker_starts(override, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**{"profile": "cpu", "num_workers": 2, **override}))


def test_total_steps_from_rows_epochs_and_batch():
    cfg = TrainConfig(profile="cpu", num_workers=2, global_batch_size=8, micro_batch_size=2, epochs=3)
    # 101 rows -> 50 per worker -> 25 micro batches each -> 3 epochs = 75 -> 37 steps of 2 micro batches.
    assert total_steps_for(101, cfg) == 37
    with pytest.raises(TrainConfigError, match="no optimizer step"):
        total_steps_for(3, cfg)


# ---------------------------------------------------------------- batching


def test_collate_pads_right_and_keeps_packed_positions():
    batch = {
        "input_ids": np.array([np.array([5, 6, 7, 8], np.int32), np.array([9, 10], np.int32)], dtype=object),
        "labels": np.array([np.array([5, 6, 7, 8], np.int32), np.array([-100, 10], np.int32)], dtype=object),
        "position_ids": np.array(
            [np.array([0, 1, 0, 1], np.int32), np.array([0, 1], np.int32)], dtype=object
        ),
    }
    out = collate(batch, max_length=4)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7, 8], [-100, 10, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]  # the pad starts a segment of its own
    assert int(out["num_tokens"]) == 6
    with pytest.raises(ValueError, match="longer than max_length 3"):  # never cut silently
        collate(batch, max_length=3)
    unpacked = collate({k: v for k, v in batch.items() if k != "position_ids"}, max_length=8)
    assert unpacked["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]


def test_step_seeds_differ_by_step_and_rank_but_repeat():
    seeds = {step_seed(42, s, r) for s in range(50) for r in range(8)}
    assert len(seeds) == 400 and step_seed(42, 7, 1) == step_seed(42, 7, 1)


def test_mfu_estimate():
    assert peak_flops_for("NVIDIA A800-SXM4-80GB", "bf16") == 312e12
    assert peak_flops_for("Tesla V100-SXM2-32GB", "fp16") == 125e12
    assert peak_flops_for("Some CPU", "fp32") is None
    # 7e9 params at 3000 tokens/s/GPU on 8 A800s, full training: 6 * 7e9 * 24000 / (8 * 312e12) = 0.404
    assert mfu(7_000_000_000, 24_000, 312e12, 8) == pytest.approx(0.4038, abs=1e-3)
    # LoRA with 1.6e8 trainable: (4 * 7e9 + 2 * 1.6e8) * 24000 / (8 * 312e12) = 0.272
    assert mfu(7_000_000_000, 24_000, 312e12, 8, 160_000_000) == pytest.approx(0.2723, abs=1e-3)
    assert mfu(10, 1.0, None, 1) is None


# ---------------------------------------------------------------- CLI


def test_cli_lists_the_training_commands_with_their_flags(capsys):
    from chatmusician.cli import main

    for command, flag in [("pretrain", "--zero_stage"), ("sft", "--lora.r"), ("merge", "--adapter")]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert flag in capsys.readouterr().out


def test_cli_rejects_a_bad_config_with_a_clear_error():
    from chatmusician.cli import run_command

    with pytest.raises(TrainConfigError, match="train_type"):
        run_command("sft", ["--config", str(ROOT / "configs" / "train_tiny.yaml"), "--train_type", "qlora"])
    with pytest.raises(TrainConfigError, match="data.shards"):
        run_command(
            "pretrain", ["--config", str(ROOT / "configs" / "train_tiny.yaml"), "--data.shards", "null"]
        )


# ---------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_activation_checkpointing_recomputes_without_changing_loss_or_gradients(tiny_model_path, train_type):
    """Same loss and gradients with and without recomputation (LoRA with frozen embeddings included, the
    case where re-entrant checkpointing silently drops gradients), and far fewer activations are kept."""
    import torch

    from chatmusician.train.modeling import build_model
    from chatmusician.train.profiles import get_profile

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [8, 9, 10, 11, 12, 13, 14, 15]])
    results = {}
    for checkpointing in (False, True):
        cfg = TrainConfig(
            model=tiny_model_path, train_type=train_type, activation_checkpointing=checkpointing
        )
        model = build_model(cfg, get_profile("cpu"))
        model.train()
        saved = []  # tensors the forward pass keeps for backward
        torch.manual_seed(0)  # same dropout masks
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t
        ):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = (loss.item(), grads, sum(saved))
    (loss_off, grads_off, saved_off), (loss_on, grads_on, saved_on) = results[False], results[True]
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys() and grads_off
    for name, grad in grads_off.items():
        assert torch.allclose(grads_on[name], grad, atol=1e-6), name
    assert saved_on < saved_off / 2, (saved_on, saved_off)  # the layers' activations are recomputed, not kept


# ---------------------------------------------------------------- fp16 skipped steps, MFU, storage, eval pieces


def test_a_step_deepspeed_skips_on_overflow_neither_counts_nor_moves_the_schedule():
    """The recipe counts only applied steps and DeepSpeed steps the schedule only then: with overflows the
    run takes more iterations, and the schedule still walks warmup -> cosine -> min_lr over the counted steps."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from chatmusician.train.checkpointing import TrainState
    from chatmusician.train.trainer import advance

    total, peak, floor = 10, 1e-3, 1e-5
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = LambdaLR(opt, lr_multiplier(total, peak, 0.2, floor))
    state, used = TrainState(), []
    overflow_at = {0, 1, 5}  # iterations whose gradients overflow (the first ones, as a too-high scale does)
    iteration = 0
    while state.step < total:
        lr = sched.get_last_lr()[0]
        applied = iteration not in overflow_at
        if applied:  # DeepSpeed: optimizer + scheduler step only when no overflow
            opt.step()
            sched.step()
            used.append(lr)
        advance(state, applied)
        iteration += 1
    assert (state.step, state.skipped_steps, iteration) == (10, 3, 13)
    assert used == pytest.approx([lr_at(s, total, peak, 0.2, floor) for s in range(total)])
    assert used[-1] == pytest.approx(floor)


def test_mfu_counts_what_lora_computes(tiny_model_path):
    from chatmusician.train.modeling import build_model
    from chatmusician.train.profiles import compute_parameters, get_profile, train_flops_per_token

    assert train_flops_per_token(100) == 600  # full training: 6N
    assert train_flops_per_token(100, 10) == 420  # LoRA: 4N + 2N_trainable
    full = build_model(TrainConfig(model=tiny_model_path, train_type="full"), get_profile("cpu"))
    n_full = sum(p.numel() for p in full.parameters())
    assert compute_parameters(full.named_parameters()) == n_full
    lora = build_model(
        TrainConfig(model=tiny_model_path), get_profile("cpu")
    )  # modules_to_save embed_tokens + lm_head
    every = sum(p.numel() for p in lora.parameters())
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    used = compute_parameters(lora.named_parameters())
    # The frozen originals behind the trained copies are not computed with: counted once, not twice.
    assert used == n_full + adapters < every
    assert mfu(used, 1000.0, 1e12, 1, trainable) == pytest.approx((4 * used + 2 * trainable) * 1000 / 1e12)
    assert mfu(used, 1000.0, 1e12, 1, trainable) < mfu(used, 1000.0, 1e12, 1)


def test_storage_location_of_local_folders_file_uris_and_other_filesystems(tmp_path):
    import pyarrow.fs as pafs

    from chatmusician.train.checkpointing import local_run_dir, storage_location

    fs, root = storage_location(TrainConfig(storage_path=f"file://{tmp_path}/runs", run_name="r"))
    assert isinstance(fs, pafs.LocalFileSystem) and root == f"{tmp_path}/runs"
    assert (
        local_run_dir(TrainConfig(storage_path=f"file://{tmp_path}/runs", run_name="r"))
        == tmp_path / "runs" / "r"
    )
    fs, root = storage_location(TrainConfig(storage_path="relative/runs"))
    assert Path(root).is_absolute() and root.endswith("relative/runs")
    assert local_run_dir(TrainConfig(storage_path="s3://bucket/runs")) is None
    stand_in = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert storage_location(TrainConfig(storage_path="bucket/runs"), stand_in) == (stand_in, "bucket/runs")


def test_token_loss_sum_is_what_the_model_averages(tiny_model_path):
    import torch

    from chatmusician.model.loading import load_model
    from chatmusician.train.batching import token_loss_sum

    model = load_model(tiny_model_path).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 9, 10, 11, 12, 13]])
    labels = ids.clone()
    labels[0, :3] = -100  # a masked source
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    total, count = token_loss_sum(out.logits, labels)
    assert count == 3 + 5 and total / count == pytest.approx(float(out.loss), rel=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"eval_every": 0}, "eval_every"),
        ({"eval_hook": "no_colon"}, "eval_hook"),
        ({"eval_hook": "nope.nothing:fn"}, "cannot be imported"),
    ],
)
def test_bad_eval_settings_are_config_errors(override, message):
    from chatmusician.train.evaluation import resolve_hook

    cfg = TrainConfig(**{"profile": "cpu", "num_workers": 2, **override})
    with pytest.raises(TrainConfigError, match=message):
        validate(cfg)
        resolve_hook(cfg.eval_hook)


def test_eval_steps_are_every_n_and_the_last():
    from chatmusician.train.evaluation import is_eval_step

    assert [s for s in range(1, 11) if is_eval_step(s, 10, 4)] == [4, 8, 10]
    assert [s for s in range(1, 11) if is_eval_step(s, 10, None)] == [10]


# ---------------------------------------------------------------- per-token loss over the optimizer step


def _rows(packed: bool) -> list[dict]:
    """8 rows of very different target counts (a masked source in some), as the data stage writes them."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate([5, 31, 12, 3, 24, 9, 17, 28]):
        ids = rng.integers(4, 3000, size=n)
        labels = ids.copy()
        labels[: (n // 3 if i % 2 else 0)] = -100  # the SFT source is masked
        row = {"input_ids": ids, "labels": labels}
        if packed:  # two documents in the row: positions restart, the second's first token is not a target
            cut = max(1, n // 2)
            row["position_ids"] = np.concatenate([np.arange(cut), np.arange(n - cut)])
            row["labels"][cut] = -100
        rows.append(row)
    return rows


def _gradients(model, rows: list[dict], workers: int, micro: int) -> dict:
    """Gradients as DeepSpeed forms them from the trainer's loss: each worker's contiguous rows in micro
    batches of ``micro``, backward of ``loss / accumulation`` (DeepSpeed's scaling), then the mean over workers
    (its data-parallel averaging), in float64."""
    import numpy as np
    import torch

    from chatmusician.train.batching import micro_batch_loss, target_tokens

    per_worker = len(rows) // workers
    accumulation = per_worker // micro
    batches = []
    for w in range(workers):
        mine = rows[w * per_worker : (w + 1) * per_worker]
        for m in range(accumulation):
            part = mine[m * micro : (m + 1) * micro]
            batch = {k: np.array([r[k] for r in part], dtype=object) for k in part[0]}
            batches.append((w, collate(batch, max_length=64)))
    step_targets = sum(target_tokens(b["labels"]) for _, b in batches)  # what the all-reduce sums
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for w in range(workers):
        model.zero_grad()
        for _, batch in (x for x in batches if x[0] == w):
            batch = {k: v for k, v in batch.items() if k != "num_tokens"}
            loss, _ = micro_batch_loss(model, batch, step_targets, workers, accumulation)
            (loss / accumulation).backward()
        for n, p in model.named_parameters():
            total[n] += p.grad / workers
    return total


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_step_gradient_is_the_mean_over_every_target_token_however_the_step_is_cut(tiny_model_path, packed):
    """1 worker x 8 rows, 1 x 4 micro batches of 2, and 2 workers x 2 micro batches of 2: the same gradient,
    that of the plain mean token loss over all 8 rows in one batch (float64). A mean per micro batch (the old
    loss) weights a token by how many share its micro batch and fails this."""
    import numpy as np
    import torch

    from chatmusician.model.loading import load_model

    model = load_model(tiny_model_path).double()
    model.config.use_cache = False
    rows = _rows(packed)
    whole = collate({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}, max_length=64)
    whole.pop("num_tokens")
    model.zero_grad()
    model(**whole).loss.backward()  # HF's mean over every target token of the 8 rows
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    for workers, micro in [(1, 8), (1, 2), (2, 2)]:
        grads = _gradients(model, rows, workers, micro)
        for name, grad in reference.items():
            torch.testing.assert_close(
                grads[name], grad, rtol=1e-9, atol=1e-12, msg=f"{workers}x{micro} {name}"
            )


def test_zero3_builds_the_model_already_partitioned(tiny_model_path, tmp_path, monkeypatch):
    """Under ZeRO-3 every weight is created inside DeepSpeed's zero.Init (partitioned as it is built: no rank
    ever holds the whole 7B), LoRA and modules_to_save included; other stages build a plain model."""
    import torch.distributed as dist

    from chatmusician.train.deepspeed_config import build_deepspeed_config
    from chatmusician.train.modeling import build_model, build_optimizer
    from chatmusician.train.profiles import get_profile

    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # as Ray Train sets them on its workers
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        cfg = TrainConfig(model=tiny_model_path, profile="cpu", zero_stage=3, num_workers=1)
        model = build_model(cfg, get_profile("cpu"), build_deepspeed_config(cfg, 1))
        base = [p for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
        assert base and all(hasattr(p, "ds_id") and p.numel() == 0 for p in base)  # partitioned placeholders
        stage2 = replace(cfg, zero_stage=2)
        plain = build_model(stage2, get_profile("cpu"), build_deepspeed_config(stage2, 1))
        assert not any(hasattr(p, "ds_id") for p in plain.parameters())
        # Weight decay goes to the same (2-D) weights although partitioned ones are 1-D placeholders.
        for train_type in ("lora", "full"):
            built = {
                stage: build_model(
                    replace(cfg, zero_stage=stage, train_type=train_type), get_profile("cpu"), ds
                )
                for stage, ds in ((3, build_deepspeed_config(cfg, 1)), (2, build_deepspeed_config(stage2, 1)))
            }
            sizes = {
                stage: [len(g["params"]) for g in build_optimizer(m, cfg, fused=False).param_groups]
                for stage, m in built.items()
            }
            assert sizes[3] == sizes[2] and sizes[3][0] > 0, (train_type, sizes)
    finally:
        dist.destroy_process_group()


def test_local_relative_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from chatmusician.train.config import SFTConfig
    from chatmusician.train.recipe import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    cfg = SFTConfig(model="models/base", storage_path="./runs")
    cfg.data.shards, cfg.data.val_shards = "shards/sft", None
    out = absolute_paths(cfg)
    assert out.model == str(tmp_path / "models" / "base") and out.storage_path == str(tmp_path / "runs")
    assert out.data.shards == str(tmp_path / "shards" / "sft") and out.data.val_shards is None
    hub = absolute_paths(SFTConfig(model="m-a-p/ChatMusician-Base", storage_path="s3://bucket/runs"))
    assert (hub.model, hub.storage_path) == (
        "m-a-p/ChatMusician-Base",
        "s3://bucket/runs",
    )  # hub ids and URIs stay
