"""Rank 0's record of a run: metrics.jsonl always, plus the trackers ``report_to`` names (TensorBoard, MLflow,
W&B), under ``<storage>/<run>/``: written in place on a local folder; on a remote filesystem (s3://...) written
to a local folder first (fetched back on resume) and copied up at each checkpoint and at the end.

A relaunch of the same run name continues the same MLflow / W&B run (its id is kept in the run's folder).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

from chatmusician.train.config import REPORTERS, TrainConfig, TrainConfigError

TRACKER_IDS = "trackers.json"


def check_reporters(names: list[str]) -> None:
    """Unknown tracker names, or a tracker whose package is missing, are a config error before the run."""
    import importlib.util

    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise TrainConfigError(f"report_to: unknown {unknown}; choose from {list(REPORTERS)}")
    missing = [n for n in names if n != "tensorboard" and importlib.util.find_spec(n) is None]
    if missing:
        raise TrainConfigError(
            f"report_to {missing}: not installed (pip install 'chatmusician[tracking]' or {' '.join(missing)})"
        )


def flat_params(cfg: TrainConfig) -> dict[str, Any]:
    """The config as flat ``a.b`` keys with scalar values (what trackers show as params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix.rstrip(".")] = (
                value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            )

    walk("", dataclasses.asdict(cfg))
    return out


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


class RunLogs:
    def __init__(self, storage: tuple[Any, str], cfg: TrainConfig, rank: int = 0):
        import pyarrow.fs as pafs

        self.fs, root = storage
        self.cfg = cfg
        self.remote = f"{root.rstrip('/')}/{cfg.run_name}"
        self.local_fs = isinstance(self.fs, pafs.LocalFileSystem)
        if self.local_fs:
            self.dir = Path(self.remote)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix=f"{cfg.run_name}-logs-"))
            if self.fs.get_file_info(self.remote).type != pafs.FileType.NotFound:
                for name in ("metrics.jsonl", "tensorboard", TRACKER_IDS):
                    info = self.fs.get_file_info(f"{self.remote}/{name}")
                    if info.type != pafs.FileType.NotFound:
                        pafs.copy_files(info.path, str(self.dir / name), source_filesystem=self.fs)
        self.dir.mkdir(parents=True, exist_ok=True)
        ids_path = self.dir / TRACKER_IDS
        self.ids: dict[str, str] = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        self.writer = self.mlflow = self.wandb = None
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tensorboard"))
        experiment = cfg.experiment or type(cfg).__name__.removesuffix("Config").lower() or "train"
        if "mlflow" in cfg.report_to:
            self._start_mlflow(experiment)
        if "wandb" in cfg.report_to:
            self._start_wandb(experiment)
        ids_path.write_text(json.dumps(self.ids))

    def _start_mlflow(self, experiment: str) -> None:
        import mlflow

        if self.cfg.tracking_uri:
            mlflow.set_tracking_uri(self.cfg.tracking_uri)
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=self.ids.get("mlflow"), run_name=self.cfg.run_name)
        if "mlflow" not in self.ids:  # params once: MLflow refuses to change a logged param
            mlflow.log_params(flat_params(self.cfg))
        self.ids["mlflow"] = run.info.run_id
        self.mlflow = mlflow

    def _start_wandb(self, project: str) -> None:
        import wandb

        run_id = self.ids.get("wandb") or uuid.uuid4().hex[:12]
        self.wandb = wandb.init(
            project=project,
            name=self.cfg.run_name,
            id=run_id,
            resume="allow",
            dir=str(self.dir),
            config=flat_params(self.cfg),
        )
        self.ids["wandb"] = run_id

    def write(self, metrics: dict[str, Any]) -> None:
        step, numbers = metrics["step"], _numbers(metrics)
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def log_export(self, folder: str | Path) -> None:
        """The run's final adapter (or model) as a tracker artifact."""
        if self.mlflow is not None:
            self.mlflow.log_artifacts(str(folder), artifact_path=Path(folder).name)
        if self.wandb is not None:
            import wandb

            artifact = wandb.Artifact(f"{self.cfg.run_name}-{Path(folder).name}", type="model")
            artifact.add_dir(str(folder))
            self.wandb.log_artifact(artifact)

    def sync(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if not self.local_fs:
            import pyarrow.fs as pafs

            self.fs.create_dir(self.remote, recursive=True)
            pafs.copy_files(str(self.dir), self.remote, destination_filesystem=self.fs)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()
        self.sync()
