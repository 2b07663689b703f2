"""The main job, top to bottom: every stage of the platform at toy scale, on an embedded local Ray."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from chatmusician.quickstart import app, compose, data, evaluation, preference, render, sweep, training
from chatmusician.quickstart.config import QuickstartConfig
from chatmusician.quickstart.console import Console, console_and_log, quiet_libraries
from chatmusician.quickstart.stages import Stages, clean
from chatmusician.quickstart.summary import print_summary, record_losses


def run(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run every stage (reusing those an earlier run finished unless ``force``); summary.json, loss.png and
    quickstart.log in ``out_dir``; the summary on the terminal."""
    out = Path(cfg.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.force:
        clean(out)
    log_path = out / cfg.log_file
    with console_and_log(log_path) as console:
        console.say(f"ChatMusician quickstart -> {out} (Ray, worker and library output: {log_path})", "bold")
        try:
            summary = stages(cfg, out, console)
        except BaseException:
            traceback.print_exc(file=console.log)  # the terminal gets the CLI's one line; the log the details
            raise
        summary["log"] = str(log_path)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary, console)
        if cfg.keep_serving and summary.get("api"):
            console.say(f"Serving {summary['api']} (web UI {summary['ui']}) until Ctrl-C.", "good")
            app.serve_until_interrupted(summary["started_ray"])
    return summary


def stages(cfg: QuickstartConfig, out: Path, console: Console) -> dict[str, Any]:
    """The platform's story: data -> tokenize -> pretrain -> sweep -> SFT -> preference round -> eval -> serve ->
    compose -> render."""
    from chatmusician.corpora import nottingham_tunes

    quiet_libraries()
    summary: dict[str, Any] = {"out_dir": str(out), "timings_s": {}}
    started = time.perf_counter()
    stage = Stages(out, console, summary, total=10 if cfg.preference else 9)
    tunes = nottingham_tunes()[: cfg.max_tunes]
    p, s = cfg.pretrain, cfg.sft

    made = stage.run(
        "model",
        f"tiny LLaMA ({cfg.model_size}) + SentencePiece tokenizer, {len(tunes)} Nottingham tunes",
        lambda: data.model_and_corpora(cfg.model_size, tunes, out),
    )
    summary["started_ray"] = started_ray = app.start_ray(cfg.num_cpus)
    try:
        summary["pt_manifest"] = stage.run(
            "tokenize_pt",
            "Ray Data: tokenize + pack the pretraining corpus",
            lambda: data.tokenize_pt(made, out, cfg.max_len),
        )
        summary["sft_manifest"] = stage.run(
            "tokenize_sft",
            f"Ray Data: tokenize the SFT set ({100 * cfg.val_fraction:.0f} % held out for validation)",
            lambda: data.tokenize_sft(made, out, cfg.max_len, cfg.val_fraction),
        )
        pre = stage.run(
            "pretrain",
            f"Ray Train + DeepSpeed ZeRO-{p.zero_stage}: {p.train_type} pretraining of the random base, "
            f"{p.max_steps} steps, {p.num_workers} workers, lr {p.lr:g}",
            lambda: training.pretrain(cfg, console, made["base"], out),
        )
        summary["sweep"] = swept = stage.run(
            "sweep",
            f"Ray Tune: {sweep.trials(cfg.sweep)}-trial LoRA SFT sweep",
            lambda: sweep.sweep(cfg, console, pre["model"], out),
        )
        tuned = stage.run(
            "sft",
            f"Ray Train: LoRA SFT (r={s.lora.r}) with the sweep's best values, then merge",
            lambda: training.sft(cfg, console, pre["model"], swept["values"], out),
        )
        final = tuned["model"]
        if cfg.preference:
            summary["preference"] = prefs = stage.run(
                "preference",
                f"preference round: {cfg.rounds.prefs.n_per_prompt} answers to {cfg.prefs_prompts} requests, music "
                f"rewards, {cfg.dpo.loss} on LoRA r={cfg.dpo.lora.r}, {cfg.dpo.max_steps} steps",
                lambda: preference.preference_round(cfg, console, final, tunes, out),
            )
            final = prefs["model"]
        summary["final_model"] = final
        summary["eval"] = stage.run(
            "eval",
            "evaluate: MusicTheoryBench fixtures (PPL) + ABC quality, Ray Data batch inference",
            lambda: evaluation.evaluate(cfg, console, final, out),
        )
        with stage.timed("serve", "Ray Serve: the app (REST + OpenAI API + web UI) on the final model"):
            client = app.start_app(final)
            summary["api"], summary["ui"] = client.base_url, f"{client.base_url}/ui/"
            console.detail(f"API {client.base_url}/docs, web UI {summary['ui']}", None)
        with client, stage.timed("compose_render", "compose through the API, then render"):
            summary["compose"] = composed = compose.compose(cfg, console, client, tunes)
            summary["render"] = render.render(client, cfg.render_formats, composed, tunes[0], out)
        summary["parse_rate"] = composed["parse_rate"]
        summary["strict_rate"] = composed.get("strict_rate")
        summary["parse_goal"] = cfg.parse_goal
        summary["parse_goal_met"] = composed["parse_rate"]["free"] >= cfg.parse_goal
        summary["serving"] = cfg.keep_serving
        if not cfg.keep_serving:
            app.stop_app()
    finally:
        if not cfg.keep_serving:
            app.stop_ray(started_ray)
    record_losses(summary, {"pretrain": pre["metrics"], "sft": tuned["metrics"]}, out)
    summary["timings_s"]["total"] = round(time.perf_counter() - started, 1)
    return summary
