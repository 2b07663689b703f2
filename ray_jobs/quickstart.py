"""`python -m ray_jobs.quickstart --config configs/quickstart.yaml`: the main job end to end on a local Ray."""

import sys

from chatmusician.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))  # one clear line on a mistake, as the CLI
