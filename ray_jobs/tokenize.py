"""``ray job submit -- python -m ray_jobs.tokenize --config configs/tokenize_pt.yaml``: the data stage as a job."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("tokenize", sys.argv[1:])
