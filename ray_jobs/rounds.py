"""Entrypoint: `ray job submit -- python -m ray_jobs.rounds --config configs/rounds.yaml [--field value …]`."""

import sys

from chatmusician.cli import main

if __name__ == "__main__":
    sys.exit(main(["rounds", *sys.argv[1:]]))  # one clear line on a mistake, as the CLI
