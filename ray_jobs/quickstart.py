"""End-to-end quickstart on an embedded local Ray (grows as the platform's stages land)."""

import sys

from chatmusician.cli import run_command

if __name__ == "__main__":
    run_command("build-tiny", sys.argv[1:])
