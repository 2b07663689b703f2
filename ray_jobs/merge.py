"""Entrypoint: `ray job submit -- python -m ray_jobs.merge --adapter runs/sft/checkpoint_…/adapter --out_dir outputs/merged`."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("merge", sys.argv[1:])
