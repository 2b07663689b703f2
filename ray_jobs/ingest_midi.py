"""``ray job submit -- python -m ray_jobs.ingest_midi --config configs/ingest_midi.yaml``: MIDI -> ABC rows as a job."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("ingest-midi", sys.argv[1:])
