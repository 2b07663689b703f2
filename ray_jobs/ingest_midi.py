"""``ray job submit -- python -m ray_jobs.ingest_midi --config configs/ingest_midi.yaml``: MIDI -> ABC rows as a job."""

import sys

from chatmusician.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest-midi", *sys.argv[1:]]))  # one clear line on a mistake, as the CLI
