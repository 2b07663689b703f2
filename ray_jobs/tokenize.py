"""``ray job submit -- python -m ray_jobs.tokenize --config configs/tokenize_pt.yaml``: the data stage as a job."""

import sys

from chatmusician.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))  # one clear line on a mistake, as the CLI
