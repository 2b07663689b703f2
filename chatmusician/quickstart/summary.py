"""The end of the job: loss curves (loss.png), and the final summary on the terminal — one table of what each
stage did, the composed tune, where everything is and the commands that come next."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from chatmusician import terminal
from chatmusician.quickstart.console import Console


def plot_losses(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for ax, (name, rows) in zip([axes] if len(curves) == 1 else axes, curves.items(), strict=True):
        train = [r for r in rows if "loss" in r and "val_loss" not in r]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        val = [r for r in rows if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(name)
        ax.legend()
    fig.suptitle("ChatMusician quickstart (tiny model, Nottingham tunes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _loss(losses: list[float]) -> str:
    return (
        f"loss {losses[0]:.2f} -> {losses[-1]:.2f} over {len(losses)} steps" if losses else "no steps logged"
    )


def _preference(p: dict[str, Any]) -> str:
    """Before -> after of the round's guards (strict validity: parses, plays, no bar-duration error, as asked)."""
    b, a = p["before"], p["after"] or {}
    parts = [f"strict validity {_pct(b.get('strict_validity'))} -> {_pct(a.get('strict_validity'))}",
             f"diversity {_num(b.get('diversity'))} -> {_num(a.get('diversity'))}",
             f"val ppl {_num(b.get('val_perplexity'))} -> {_num(a.get('val_perplexity'))}",
             f"{p['pairs']} pairs"]  # fmt: skip
    return ", ".join(parts) + ("" if p["status"] == "ok" else f" ({p['status']}; the SFT model kept)")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def stage_table(s: dict[str, Any]) -> Table:
    """One row per stage: what it gave and how long it took (0 s: reused from an earlier run)."""
    t, rate, ev = s["timings_s"], s["parse_rate"], s["eval"]
    strict = s.get("strict_rate") or {}
    goal = f"goal >= {_pct(s['parse_goal'])} " + ("met" if s["parse_goal_met"] else "NOT met")
    rows = [
        ("tokenize", f"{s['pt_manifest']['rows_read']} tunes -> {s['pt_manifest']['sequences']} packed blocks, "
                     f"{s['sft_manifest']['sequences']} SFT rows", t.get("tokenize_pt", 0) + t.get("tokenize_sft", 0)),
        ("pretrain", _loss(s["loss"]["pretrain"]), t.get("pretrain", 0)),
        ("sweep", f"best {json.dumps(s['sweep']['values'])}, val_loss {s['sweep']['best_val_loss']:.3f}",
         t.get("sweep", 0)),
        ("sft", _loss(s["loss"]["sft"]), t.get("sft", 0)),
        *([("preference", _preference(s["preference"]), t.get("preference", 0))] if s.get("preference") else []),
        ("eval", f"MusicTheoryBench zero-shot {_pct(ev.get('mtb_ppl_zero_shot'))}, few-shot "
                 f"{_pct(ev.get('mtb_ppl_few_shot'))}; ABC parse {_pct(ev.get('abc_parse_success'))}", t.get("eval", 0)),
        ("serve", f"{s['api']}", t.get("serve", 0)),
        ("compose", f"free {_pct(rate['free'])} parse ({goal}), constrained {_pct(rate['constrained'])}; "
                    f"strictly valid (parses, plays, no bar-duration error): free {_pct(strict.get('free'))}, "
                    f"constrained {_pct(strict.get('constrained'))}; "
                    f"rendered {'ok' if s['render']['ok'] else 'with errors'}", t.get("compose_render", 0)),
    ]  # fmt: skip
    table = terminal.table("ChatMusician quickstart", "stage", "result", "time")
    table.columns[0].style, table.columns[2].justify = "bold", "right"
    for name, result, seconds in rows:
        style = "red" if name == "compose" and not s["parse_goal_met"] else None
        terminal.add_row(table, name, result, f"{seconds:.0f} s", style=style)
    terminal.add_row(table, "total", "", f"{t['total']:.0f} s", style="bold")
    return table


def print_summary(s: dict[str, Any], console: Console) -> None:
    say = console.say
    say()
    console.show(stage_table(s))
    say()
    r = s["render"]
    say(f"composed tune ({r['source']}):" if not r["fallback_reason"] else
        f"rendered a fallback, {r['source']}, because {r['fallback_reason']}:", "bold")  # fmt: skip
    for line in r["abc"].strip().splitlines():
        say(f"    {line}", "cyan")
    files = ", ".join(sorted(Path(f).name for f in r["files"].values()))
    say(f"renders: {Path(r['files']['abc']).parent}/ ({files})")
    if not r["ok"]:
        say(f"render problems: {json.dumps(r['errors'])[:300]}", "bad")
    model = s["final_model"]
    say(f"final model: {model}")
    if s.get("serving"):
        say(f"API: {s['api']}/docs   web UI: {s['ui']}", "good")
    else:
        say(f"the app served on {s['api']} (web UI {s['ui']}) during the run; serve it again with:")
    say(f"    chatmusician serve --model {model}        # then open http://127.0.0.1:8000/ui/", "bold")
    say(f"    chatmusician chat --model {model}", "bold")
    say(
        f"loss curves: {s['loss_plot']}   sweep: {s['sweep']['dir']}/results.csv   eval: {s['eval']['dir']}/results.md"
    )
    say(f"summary: {s['out_dir']}/summary.json   log (Ray, workers, libraries): {s['log']}")


def record_losses(summary: dict[str, Any], metrics: dict[str, str], out: Path) -> None:
    """Each run's training losses into the summary, and the curves (validation too) as out/loss.png."""
    from chatmusician.quickstart.training import read_metrics

    curves = {name: read_metrics(path) for name, path in metrics.items()}
    summary["loss"] = {k: [round(r["loss"], 4) for r in v if "loss" in r] for k, v in curves.items()}
    plot_losses(curves, out / "loss.png")
    summary["loss_plot"] = str(out / "loss.png")
