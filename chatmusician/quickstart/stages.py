"""Numbered stages with timings, and reuse: a finished stage's result is saved in out_dir/stages/<key>.json and a
second run returns it instead of doing the work again (``force`` removes what the job wrote)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatmusician.quickstart.config import GENERATED
from chatmusician.quickstart.console import Console


class Stages:
    """Stage headers ``[n/total] title``, ``done in N s``; ``summary["timings_s"][key]`` per stage."""

    def __init__(self, out: Path, console: Console, summary: dict[str, Any], total: int):
        self.dir, self.console, self.summary, self.n, self.total = out / "stages", console, summary, 0, total
        self.dir.mkdir(parents=True, exist_ok=True)

    def run(self, key: str, title: str, fn: Callable[[], Any]) -> Any:
        """The saved result of stage ``key`` if a run finished it, else ``fn()`` (timed and saved)."""
        done = self.dir / f"{key}.json"
        if done.exists():
            self.n += 1
            self.console.stage(self.n, self.total, title, f": reused ({done})")
            self.summary["timings_s"][key] = 0.0
            return json.loads(done.read_text())
        with self.timed(key, title):
            result = fn()
        done.write_text(json.dumps(result, indent=2))
        return result

    @contextmanager
    def timed(self, key: str, title: str) -> Iterator[None]:
        """A stage done every run (the running app, what is asked of it): its header, its time."""
        self.n += 1
        self.console.stage(self.n, self.total, title)
        t = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.console.detail(f"failed: {type(exc).__name__} (the log has the traceback)", "bad")
            raise
        seconds = time.perf_counter() - t
        self.summary["timings_s"][key] = round(seconds, 1)
        self.console.detail(f"done in {seconds:.0f} s", "done")


def clean(out: Path) -> None:
    """Remove the folders this job writes in ``out`` and nothing else."""
    for name in GENERATED:
        shutil.rmtree(out / name, ignore_errors=True)
