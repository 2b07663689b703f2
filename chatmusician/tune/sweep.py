"""LoRA hyperparameter sweeps with Ray Tune on Train V2: one function trial per point of the space, each building
and fitting its own ``TorchTrainer`` (the recipe of chatmusician.train), ASHA on the validation loss.

Supports: any train config field swept by dotted name (YAML specs, chatmusician.tune.space); random, grid and
Optuna TPE search, seeded; ASHA early stopping scheduled on the recipe's own ``step`` (Tune's
``training_iteration`` restarts after a restore); ``max_concurrent_trials`` derived from the cluster and what a
trial holds; a failed trial retried (``FailureConfig``), resuming its own Train run (a deterministic run name
per trial under the sweep's storage); an interrupted sweep resumed by re-running the same command (finished
trials are not re-run). Output in ``<storage_path>/<name>/``: ``results.csv``, ``val_loss.png``,
``best.yaml`` (a complete train config with the winning values), the best adapter's path, a printed summary.

Ray: a local Ray is started with the dashboard on (Tune's cleaner of stopped trials' placement groups calls the
State API); on an existing cluster (``RAY_ADDRESS``, ``ray job submit``) the sweep connects to it. Either way the
cluster's own dashboard address is handed to every process of the sweep (``RAY_API_SERVER_ADDRESS``), so that
State API calls never guess among several Ray instances alive on the host.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from chatmusician import terminal
from chatmusician.tune.config import SweepConfig
from chatmusician.tune.space import (
    SweepConfigError,
    check_space,
    config_yaml,
    max_concurrent,
    train_config,
    tune_domains,
)

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def sweep_dir(cfg: SweepConfig) -> Path:
    return Path(cfg.storage_path).expanduser().absolute() / cfg.name


def base_config(cfg: SweepConfig):
    """The base train config with the sweep's overrides (what every trial starts from), checked."""
    from chatmusician.train.inputs import val_shards_path
    from chatmusician.train.recipe import validate

    if not Path(cfg.base).is_file():
        raise SweepConfigError(
            f"base config {cfg.base!r} does not exist: pass --base configs/sft.yaml (or yours)"
        )
    train = train_config(cfg.base, cfg.command, cfg.overrides, {})
    validate(train)
    if val_shards_path(train) is None:  # else every trial would run to the end with nothing for ASHA to judge
        raise SweepConfigError(
            f"sweeps rank trials on val_loss, but {train.data.shards or 'the base'} has no validation split: "
            "tokenize with val_fraction > 0 (it writes <shards>/val) or set data.val_shards"
        )
    if not train.eval_every:
        raise SweepConfigError("set eval_every in the base or overrides: ASHA needs val_loss during the run")
    return train


def check(cfg: SweepConfig):
    """Everything that can be checked before Ray starts; returns the base train config."""
    from chatmusician.tune.space import CONFIGS

    if cfg.num_samples < 1:
        raise SweepConfigError(f"num_samples must be positive, got {cfg.num_samples}")
    if cfg.trial_cpus <= 0:
        raise SweepConfigError(f"trial_cpus must be positive (Tune refuses 0), got {cfg.trial_cpus}")
    if cfg.asha.grace_period < 1 or cfg.asha.reduction_factor < 2:
        raise SweepConfigError("asha.grace_period must be >= 1 and asha.reduction_factor >= 2")
    check_space(cfg.space, cfg.search, CONFIGS[cfg.command])
    base = base_config(cfg)
    if base.max_steps is None:
        raise SweepConfigError("set max_steps in the base or overrides: ASHA's rungs are counted in steps")
    return base


# ---------------------------------------------------------------- one trial (runs in a Tune trial actor)


def _trial_index(trial_id: str) -> int:
    return int(trial_id.rsplit("_", 1)[-1])


def run_trial(config: dict[str, Any], sweep: SweepConfig, root: str) -> None:
    """Tune's function trial: this point's train config, fitted with a ``TorchTrainer`` whose validation
    reports go to Tune. Its run name is the trial id, so a retried or restored trial resumes its own run."""
    from ray import tune

    from chatmusician.train.recipe import trainer_for

    trial_id = tune.get_context().get_trial_id()
    values = {k: config[k] for k in sweep.space}
    base = train_config(sweep.base, sweep.command, sweep.overrides, values)
    # A checkpoint at every validation, all kept (adapters only: small), so the trial's best is on disk.
    fixed: dict[str, Any] = {
        "run_name": f"trial_{trial_id}",
        "storage_path": f"{root}/trials",
        "checkpoint_every": base.eval_every,
        "keep_last": -(-base.max_steps // base.eval_every) + 1,
    }
    if sweep.fail_trial_once is not None and _trial_index(trial_id) == sweep.fail_trial_once:
        # A worker dies once, after the first checkpoint; Train gives up at once, so the trial itself fails.
        fixed |= {"fail_at_step": fixed["checkpoint_every"] + 1, "max_failures": 0}
    train = train_config(sweep.base, sweep.command, sweep.overrides, values, **fixed)
    result = trainer_for(train, callbacks=[_validation_callback(sweep.metric)]).fit()
    if result.error:
        raise result.error


def _validation_callback(metric: str):
    """Ray Train -> Tune reports, only those that carry ``metric`` (Tune raises on a result without it).
    Built inside the trial: the base class needs the Tune session."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValidationReportCallback()


# ---------------------------------------------------------------- Ray and the Tuner


def connect() -> bool:
    """Join ``RAY_ADDRESS``'s cluster or start a local one (dashboard on, loopback), and hand the cluster's own
    dashboard address to every process of this job (``RAY_API_SERVER_ADDRESS`` in the job's runtime env).

    Why: Train's cleaner of a stopped trial's placement group asks the State API whether the trial's controller
    is alive; with no address it guesses the cluster from /tmp/ray and the GCS processes on the host, which
    fails with "Found multiple active Ray instances" (or finds another user's cluster) when several run on one
    machine, and the freed resources leak. Returns whether Ray was started here (and must be shut down)."""
    import ray

    from chatmusician.ray_local import free_port, init_local

    if ray.is_initialized():  # the caller's cluster; its processes' environment is the caller's business
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=True)
        dashboard = context.dashboard_url
        if not dashboard:
            ray.shutdown()
            raise SweepConfigError(
                f"the Ray cluster at {address} runs without its dashboard; Tune needs it (State API): "
                "start it with `ray start --head --include-dashboard=true`"
            )
        ray.shutdown()  # the runtime env is fixed at connection: connect again with the address in it
        url = dashboard if "://" in dashboard else f"http://{dashboard}"
        ray.init(address=address, runtime_env={"env_vars": {API_SERVER_ENV: url}})
        return True
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ[API_SERVER_ENV] = url  # inherited by the processes of the cluster started here
    init_local(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=True,
        runtime_env={"env_vars": {API_SERVER_ENV: url}},
    )
    return True


def _tuner(cfg: SweepConfig, base, root: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=cfg, root=str(root)), {"CPU": cfg.trial_cpus}
    )
    run_config = tune.RunConfig(
        name=cfg.name,
        storage_path=str(root.parent),
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
    )
    if tune.Tuner.can_restore(str(root)):
        print(f"[sweep] resuming {root} (finished trials keep their results)", flush=True)
        return tune.Tuner.restore(str(root), trainable=trainable, resume_errored=True)
    from chatmusician.train.placement import live_nodes, worker_resources

    concurrent = max_concurrent(base, cfg.trial_cpus, live_nodes(), cfg.max_concurrent_trials)
    need = {"driver CPU": cfg.trial_cpus, f"{base.num_workers} workers x": worker_resources(base)}
    scheduler = (
        ASHAScheduler(
            time_attr="step",
            max_t=base.max_steps,
            grace_period=cfg.asha.grace_period,
            reduction_factor=cfg.asha.reduction_factor,
        )
        if cfg.asha.enabled
        else FIFOScheduler()
    )
    search_alg = None
    if cfg.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    else:
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)
    print(
        f"[sweep] {cfg.num_samples} x {cfg.search} trials, {concurrent} at once (each holds {need})",
        flush=True,
    )
    return tune.Tuner(
        trainable,
        param_space=tune_domains(cfg.space, cfg.search),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode="min",
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=cfg.num_samples,
            # Optuna is a Searcher: Tune limits it; the variant generator limits itself (above).
            max_concurrent_trials=concurrent if cfg.search == "optuna" else None,
        ),
        run_config=run_config,
    )


# ---------------------------------------------------------------- results


def trial_rows(results, cfg: SweepConfig, root: Path, max_steps: int) -> list[dict[str, Any]]:
    """One row per trial: swept values, best and last validation loss, steps run, stopped early, time,
    status, the adapter of its checkpoint at the best validation loss, and the validation curve (the plot)."""
    rows = []
    for result in results:
        trial_id = Path(result.path).name.split("_", 2)[-1] if result.path else ""
        trial_id = result.metrics.get("trial_id", trial_id) if result.metrics else trial_id
        history = result.metrics_dataframe
        curve = []
        if history is not None and cfg.metric in history:
            curve = [(int(s), float(v)) for s, v in zip(history["step"], history[cfg.metric], strict=True)]
        steps = curve[-1][0] if curve else 0
        run_dir = root / "trials" / f"trial_{trial_id}"
        best_step = min(curve, key=lambda sv: sv[1])[0] if curve else None
        best_adapter = run_dir / f"checkpoint_{best_step or 0:07d}" / "adapter"
        rows.append(
            {
                "trial_id": trial_id,
                **{k: _cell((result.config or {}).get(k)) for k in cfg.space},
                "best_val_loss": min((v for _, v in curve), default=float("nan")),
                "last_val_loss": curve[-1][1] if curve else float("nan"),
                "steps": steps,
                "stopped_early": result.error is None and steps < max_steps,
                "time_s": round(float((result.metrics or {}).get("time_total_s", 0.0)), 1),
                "status": "error" if result.error is not None else "finished",
                "best_step": best_step,
                "adapter": str(best_adapter) if best_adapter.is_dir() else "",
                "curve": curve,
            }
        )
    return sorted(rows, key=lambda r: r["trial_id"])


def _cell(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def write_outputs(rows: list[dict[str, Any]], cfg: SweepConfig, root: Path) -> dict[str, Any]:
    """results.csv, val_loss.png and best.yaml in the sweep's folder; returns the best row."""
    columns = [k for k in rows[0] if k != "curve"]
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r[k] for k in columns} for r in rows)
    plot_curves(rows, cfg.metric, root / "val_loss.png")
    finished = [r for r in rows if r["curve"]]
    if not finished:
        raise RuntimeError(f"no trial reported {cfg.metric}: see the trials' logs under {root}")
    best = min(finished, key=lambda r: r["best_val_loss"])
    values = {k: best[k] for k in cfg.space}
    winner = train_config(cfg.base, cfg.command, cfg.overrides, values, run_name=f"{cfg.name}-best")
    header = (
        f"Winner of sweep {cfg.name!r} (trial {best['trial_id']}, best {cfg.metric} {best['best_val_loss']:.4f}):\n"
        f"{json.dumps(values)}\nRun it: chatmusician {cfg.command} --config best.yaml\n"
        f"Its adapter: {best['adapter']}"
    )
    (root / "best.yaml").write_text(config_yaml(winner, header))
    (root / "best.json").write_text(json.dumps({k: v for k, v in best.items() if k != "curve"}, indent=2))
    return best


def plot_curves(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if not row["curve"]:
            continue
        steps, values = zip(*row["curve"], strict=True)
        label = f"{row['trial_id']}" + (" (stopped early)" if row["stopped_early"] else "")
        ax.plot(steps, values, marker="o", linestyle="--" if row["stopped_early"] else "-", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("Validation loss per trial (dashed: stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(rows: list[dict[str, Any]], cfg: SweepConfig) -> Table:
    """One row per trial: its swept values, best and last validation loss, steps, early stop, time."""
    keys = list(cfg.space)
    table = terminal.table(f"sweep {cfg.name}", "trial", *keys, "best", "last", "steps", "early", "time_s")
    for column in table.columns[1:]:
        column.justify = "right"
    for r in rows:
        terminal.add_row(
            table,
            r["trial_id"],
            *(_short(r[k]) for k in keys),
            f"{r['best_val_loss']:.4f}",
            f"{r['last_val_loss']:.4f}",
            str(r["steps"]),
            "yes" if r["stopped_early"] else "",
            str(r["time_s"]),
        )
    return table


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- entrypoint


def run(cfg: SweepConfig) -> dict[str, Any]:
    """CLI / ``ray job submit`` entry: check, connect, sweep (or resume it), write the outputs, print a summary."""
    import ray

    base = check(cfg)
    root = sweep_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    started = connect()
    try:
        t0 = time.perf_counter()
        results = _tuner(cfg, base, root).fit()
        rows = trial_rows(results, cfg, root, base.max_steps)
        best = write_outputs(rows, cfg, root)
    finally:
        if started:
            ray.shutdown()
    out = terminal.console()
    terminal.print_whole(out, summary_table(rows, cfg))
    out.print(
        f"[sweep] {len(rows)} trials in {time.perf_counter() - t0:.0f} s; best: trial {best['trial_id']} "
        f"{cfg.metric} {best['best_val_loss']:.4f}; adapter {best['adapter']}",
        markup=False,
    )
    out.print(
        f"[sweep] {root}/results.csv, val_loss.png, best.yaml (chatmusician {cfg.command} --config {root}/best.yaml)",
        markup=False,
    )
    return {"dir": str(root), "best": {k: v for k, v in best.items() if k != "curve"}, "trials": len(rows)}
