"""`python -m ray_jobs.quickstart --config configs/quickstart.yaml`: the main job end to end on a local Ray."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("quickstart", sys.argv[1:])
