"""The main job, end to end on an embedded local Ray: the whole ChatMusician recipe at toy scale.

tiny LLaMA + tokenizer -> Ray Data tokenize (pt, packed) -> Ray Train LoRA continual pretraining (DeepSpeed) ->
merge -> Ray Data tokenize (sft) -> Ray Train LoRA SFT -> merge -> compose from the original's prompts ->
sandboxed render (MIDI, MP3, SVG, PNG) -> ``summary.json`` and ``loss.png`` in ``out_dir``.

The data are the 1,034 Nottingham tunes: as raw text for pretraining, and as "recreate this header as a score"
instructions for SFT (the paper's text-to-music task).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatmusician.data.config import SourceConfig, TokenizeConfig
from chatmusician.train.config import PretrainConfig, SFTConfig


def _tiny_train(config_cls, run_name: str, steps: int):
    """Stage defaults sized for 2 CPU cores and the nano model (the paper's values live in configs/*.yaml)."""
    from chatmusician.train.config import LoraConfig

    return lambda: config_cls(
        run_name=run_name,
        lora=LoraConfig(r=16, alpha=16, dropout=0.1),
        profile="cpu",
        zero_stage=2,
        num_workers=2,
        cpus_per_worker=0.5,
        global_batch_size=8,
        micro_batch_size=2,
        max_length=256,
        max_steps=steps,
        lr=2e-3,
        checkpoint_every=steps,
        keep_last=1,
        max_failures=1,
        log_every=5,
    )


@dataclass
class QuickstartConfig:
    """The main job on one machine: every stage of the platform on the tiny offline model and real ABC tunes."""

    out_dir: str = "./outputs/quickstart"
    """Where shards, runs, merged models, renders, summary.json and loss.png go."""
    model_size: str = "nano"
    """Tiny model size (nano | micro | small); real runs use configs/pretrain.yaml with a hub id instead."""
    max_tunes: int = 1034
    """How many Nottingham tunes to use (all 1,034 by default)."""
    max_len: int = 256
    """Token block length for packing and training."""
    pretrain: PretrainConfig = field(default_factory=_tiny_train(PretrainConfig, "quickstart-pretrain", 40))
    """Continual-pretraining stage (model, data and storage_path are filled in by the job)."""
    sft: SFTConfig = field(default_factory=_tiny_train(SFTConfig, "quickstart-sft", 40))
    """SFT stage (model, data and storage_path are filled in by the job)."""
    compose_prompts: int = 2
    """How many of the original's example prompts to answer with the final model."""
    render_formats: list[str] = field(default_factory=lambda: ["midi", "mp3", "svg", "png"])
    """Formats to render for the composed tune (or, if the tiny model wrote no valid ABC, a reference tune)."""
    num_cpus: int = 4
    """Logical CPUs of the embedded Ray (more than the cores, so Data tasks never starve train workers)."""


def header_description(tune: str) -> dict[str, str]:
    """The header fields of a tune that the text-to-music task describes (M, L, K, R, T) as label -> value."""
    wanted = {"T": "Title", "M": "Meter", "L": "Note Length", "K": "Key", "R": "Rhythm"}
    found: dict[str, str] = {}
    for line in tune.splitlines():
        m = re.match(r"^([A-Z]):\s*(.*)$", line)
        if m and m.group(1) in wanted and wanted[m.group(1)] not in found and m.group(2).strip():
            found[wanted[m.group(1)]] = m.group(2).strip()
    return found


def write_corpora(tunes: list[str], data_dir: Path) -> tuple[Path, Path]:
    """Nottingham as a pt corpus ({"text"}) and a text-to-music SFT set ({"instruction", "input", "output"})."""
    from chatmusician.prompts import text_to_music

    data_dir.mkdir(parents=True, exist_ok=True)
    pt, sft = data_dir / "pt.jsonl", data_dir / "sft.jsonl"
    with pt.open("w") as f_pt, sft.open("w") as f_sft:
        for i, tune in enumerate(tunes):
            f_pt.write(json.dumps({"text": tune, "src": "nottingham", "id": i}) + "\n")
            row = {"instruction": text_to_music(header_description(tune)), "input": "", "output": tune}
            f_sft.write(json.dumps(row) + "\n")
    return pt, sft


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    rows = manifest["rows"]
    return {"rows_read": rows["read"], "rows_rejected": rows["rejected"], "sequences": manifest["sequences"]}


def _stage(name: str):
    print(f"\n==> {name}", flush=True)
    return time.perf_counter()


def _tokenize(
    source: Path, mode: str, tokenizer: str, output_dir: Path, max_len: int, **options
) -> dict[str, Any]:
    """One Ray Data tokenize stage into ``output_dir``; returns the manifest's headline counts."""
    from chatmusician.data.pipeline import write_shards

    config = TokenizeConfig(
        sources=[SourceConfig(path=str(source))],
        mode=mode,
        tokenizer=tokenizer,
        max_len=max_len,
        output_dir=str(output_dir),
        **options,
    )
    return manifest_summary(write_shards(config))


def _train_and_merge(train_cfg, shards: Path, base: str, out: Path, merged: Path) -> tuple[str, list[dict]]:
    from chatmusician.model.merge import merge_adapter
    from chatmusician.train.recipe import train

    train_cfg.model = base
    train_cfg.data.shards = str(shards)
    train_cfg.storage_path = str(out / "runs")
    result = train(train_cfg)
    adapter = Path(result.checkpoint.path) / "adapter"
    merge_adapter(adapter, merged, base_model=base)
    metrics_file = out / "runs" / train_cfg.run_name / "metrics.jsonl"
    metrics = (
        [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    )
    return str(merged), metrics


def plot_losses(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("ChatMusician quickstart (tiny model, Nottingham tunes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: QuickstartConfig) -> dict[str, Any]:
    import ray

    from chatmusician.corpora import nottingham_tunes
    from chatmusician.model.tiny import ensure_tiny
    from chatmusician.ray_local import init_local

    out = Path(cfg.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out_dir": str(out), "timings_s": {}}
    started = time.perf_counter()
    init_local(num_cpus=cfg.num_cpus, log_to_driver=True)
    try:
        t = _stage("1/6 tiny LLaMA + SentencePiece tokenizer (offline stand-in for LLaMA2-7B)")
        base = str(ensure_tiny(cfg.model_size))
        tunes = nottingham_tunes()[: cfg.max_tunes]
        pt_file, sft_file = write_corpora(tunes, out / "data")
        summary["timings_s"]["model"] = time.perf_counter() - t

        t = _stage("2/6 Ray Data: tokenize + pack the pretraining corpus")
        summary["pt_manifest"] = _tokenize(
            pt_file, "pt", base, out / "shards" / "pt", cfg.max_len, packing="greedy"
        )
        summary["timings_s"]["tokenize_pt"] = time.perf_counter() - t

        t = _stage("3/6 Ray Train + DeepSpeed ZeRO-2: LoRA continual pretraining, then merge")
        pt_model, pt_metrics = _train_and_merge(
            cfg.pretrain, out / "shards" / "pt", base, out, out / "merged-pretrain"
        )
        summary["timings_s"]["pretrain"] = time.perf_counter() - t

        t = _stage("4/6 Ray Data + Ray Train: tokenize the SFT set, LoRA SFT, merge")
        summary["sft_manifest"] = _tokenize(
            sft_file, "sft", pt_model, out / "shards" / "sft", cfg.max_len, max_source_len=cfg.max_len // 2
        )
        final_model, sft_metrics = _train_and_merge(
            cfg.sft, out / "shards" / "sft", pt_model, out, out / "chatmusician-tiny"
        )
        summary["final_model"] = final_model
        summary["timings_s"]["sft"] = time.perf_counter() - t
    finally:
        ray.shutdown()

    t = _stage("5/6 compose from the original's example prompts")
    summary["compositions"] = compose(final_model, cfg.compose_prompts)
    summary["timings_s"]["compose"] = time.perf_counter() - t

    t = _stage("6/6 sandboxed render: MIDI, MP3, SVG, PNG")
    summary["render"] = render_best(summary["compositions"], tunes[0], cfg.render_formats, out / "render")
    summary["timings_s"]["render"] = time.perf_counter() - t

    curves = {"pretrain": pt_metrics, "sft": sft_metrics}
    summary["loss"] = {k: [round(r["loss"], 4) for r in v] for k, v in curves.items()}
    plot_losses(curves, out / "loss.png")
    summary["timings_s"]["total"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def compose(model_path: str, n_prompts: int) -> list[dict[str, Any]]:
    from chatmusician.chat import predict
    from chatmusician.prompts import EXAMPLE_PROMPTS
    from chatmusician.serve.composer import load_engine
    from chatmusician.serve.config import ChatConfig, GenerationDefaults

    config = ChatConfig(model=model_path, seed=0, generation=GenerationDefaults(max_new_tokens=200))
    return predict(load_engine(config), config, EXAMPLE_PROMPTS[:n_prompts])


def render_best(
    compositions: list[dict], reference_tune: str, formats: list[str], out: Path
) -> dict[str, Any]:
    """Render the first composed tune the validator accepts; a tiny model may write none, then a reference tune."""
    from chatmusician.render import RenderRequest, render

    candidates = [
        (f"composed for prompt {i + 1}", c["abc"]) for i, c in enumerate(compositions) if c.get("abc")
    ]
    for source, abc in [*candidates, ("reference Nottingham tune", reference_tune)]:
        result = render(RenderRequest(abc=abc, formats=formats))
        if result.ok:
            out.mkdir(parents=True, exist_ok=True)
            ext = {"midi": "mid"}
            files = {}
            for fmt, data in result.outputs.items():
                path = out / f"tune.{ext.get(fmt, fmt)}"
                path.write_bytes(data)
                files[fmt] = str(path)
            return {"source": source, "files": files, "duration_s": result.duration_s}
    return {"source": None, "errors": result.errors}


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ChatMusician quickstart")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    t = summary["timings_s"]
    table.add_row("tokenize pt", json.dumps(summary["pt_manifest"]), f"{t['tokenize_pt']:.1f}")
    for stage in ("pretrain", "sft"):
        losses = summary["loss"][stage]
        curve = (
            f"{losses[0]:.2f} → {losses[-1]:.2f} over {len(losses)} steps (min {min(losses):.2f})"
            if losses
            else "-"
        )
        table.add_row(f"{stage} loss", curve, f"{t[stage]:.1f}")
    first = summary["compositions"][0]
    table.add_row("compose", (first.get("output") or "")[:80].replace("\n", " ⏎ "), f"{t['compose']:.1f}")
    table.add_row(
        "render",
        f"{summary['render'].get('source')}: {sorted(summary['render'].get('files', {}))}",
        f"{t['render']:.1f}",
    )
    table.add_row("total", f"{summary['out_dir']} (summary.json, loss.png, render/)", f"{t['total']:.1f}")
    Console().print(table)
