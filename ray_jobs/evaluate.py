"""``ray job submit -- python -m ray_jobs.evaluate --config configs/eval.yaml``: the evaluation as a job."""

import sys

from chatmusician.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))  # one clear line on a mistake, as the CLI
