"""Entrypoint: `ray job submit -- python -m ray_jobs.sft --config configs/sft.yaml [--field value …]`."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("sft", sys.argv[1:])
