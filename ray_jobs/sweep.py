"""Entrypoint: `ray job submit -- python -m ray_jobs.sweep --config configs/sweep_lora.yaml [--field value …]`."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("sweep", sys.argv[1:])
