"""``ray job submit -- python -m ray_jobs.evaluate --config configs/eval.yaml``: the evaluation as a job."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("eval", sys.argv[1:])
