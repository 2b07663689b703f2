"""Entrypoint: `ray job submit -- python -m ray_jobs.sft --config configs/sft.yaml [--field value …]`."""

import sys

from chatmusician.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))  # one clear line on a mistake, as the CLI
