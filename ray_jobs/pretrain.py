"""Entrypoint: `ray job submit -- python -m ray_jobs.pretrain --config configs/pretrain.yaml [--field value …]`."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("pretrain", sys.argv[1:])
