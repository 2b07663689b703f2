"""Run one training config in fp16 on CPU workers: DeepSpeed's real fp16 path (dynamic loss scaling, skipped
steps on overflow) without a GPU.

Used by tests/test_train_recipe.py in a subprocess (its own local Ray: a process joins one cluster, and the
setup hook below must reach every worker from the start). DeepSpeed refuses fp16 on its CPU accelerator by
policy only (``is_fp16_supported`` is None there; torch's CPU kernels run float16), so each Ray worker allows it
and gets a ``cpu-fp16`` profile: the cpu profile in fp16. The loss scale starts at 2**20, so the first steps
overflow (the tiny model's scaled gradients fit fp16's 65504 only below ~2**17) and DeepSpeed skips them,
halving the scale after each (hysteresis 2).

    python tests/fp16_cpu_train.py CONFIG.pkl
"""

from __future__ import annotations

import os
import pickle
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["HF_HUB_OFFLINE"] = "1"

INITIAL_SCALE_POWER = 20


def allow_cpu_fp16() -> None:
    """Runs in the driver and in every Ray worker before any task (``worker_process_setup_hook``)."""
    from dataclasses import replace

    from deepspeed.accelerator import get_accelerator

    from chatmusician.train import deepspeed_config, profiles

    get_accelerator().is_fp16_supported = lambda: True
    profiles.PROFILES["cpu-fp16"] = replace(profiles.PROFILES["cpu"], name="cpu-fp16", precision="fp16")
    precision_section = deepspeed_config.precision_section

    def overflowing_first(precision: str) -> dict:
        section = precision_section(precision)
        if precision == "fp16":
            section["fp16"]["initial_scale_power"] = INITIAL_SCALE_POWER
        return section

    deepspeed_config.precision_section = overflowing_first


def main(config_path: str) -> None:
    import ray

    from chatmusician.ray_local import init_local
    from chatmusician.train.recipe import train

    cfg = pickle.loads(open(config_path, "rb").read())
    allow_cpu_fp16()
    init_local(num_cpus=2, runtime_env={"worker_process_setup_hook": allow_cpu_fp16})
    try:
        train(cfg)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
