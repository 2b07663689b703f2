"""Entrypoint: `ray job submit -- python -m ray_jobs.merge --adapter runs/sft/checkpoint_…/adapter --out_dir outputs/merged`."""

import sys

from chatmusician.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))  # one clear line on a mistake, as the CLI
