"""The project's terminal style in one place: a rich console that stays plain text off a terminal (CI logs,
``ray job logs``: no colour or cursor codes, long paths never wrapped), one table style, one progress line.

The quickstart, the sweep's summary, the planner's table and the long jobs' progress lines all use it, so every
command reads alike.
"""

from __future__ import annotations

from typing import IO

from rich import box
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

STYLES = {"stage": "bold cyan", "detail": "dim", "done": "green", "good": "green", "bad": "bold red"}
"""Named styles: stage headers, indented details, a finished step, a goal met, a problem."""


def console(file: IO[str] | None = None, min_width: int = 0) -> Console:
    """A rich console on ``file`` (default stdout): its real width on a terminal (at least ``min_width``), 120
    columns elsewhere; lines are never wrapped (a path stays whole to copy), markup is not highlighted."""
    term = Console(file=file, soft_wrap=True, highlight=False)
    if not term.is_terminal:
        term.width = max(120, min_width)
    elif min_width > term.width:
        term.width = min_width
    return term


def print_whole(term: Console, renderable: RenderableType) -> None:
    """Print a table whole: off a terminal (a log scrolls sideways) the console widens to the table's natural
    width rather than wrap a cell, so a trial id or a path stays on one line to find and copy."""
    if not term.is_terminal:
        natural = Measurement.get(term, term.options.update(width=100_000), renderable).maximum
        term.width = max(term.width, natural)
    term.print(renderable)


def table(title: str | None = None, *columns: str) -> Table:
    """A table in the project's style: a rule under the header, no outer box, the title on the left."""
    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    for name in columns:
        t.add_column(name)
    return t


def add_row(t: Table, *cells: str, style: str | None = None) -> None:
    """A row of plain-text cells (a swept value like ``[q_proj, v_proj]`` is text, not rich markup)."""
    t.add_row(*(Text(c) for c in cells), style=style)


def bar(done: int, total: int, width: int = 24) -> str:
    """A plain-text bar, readable anywhere: ``[######..................]``."""
    filled = round(width * min(done, total) / max(1, total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_line(label: str, done: int, total: int, status: str = "") -> str:
    """One progress line: ``label [######....] 60/300 status`` (what a live bar shows, as text)."""
    return f"{label} {bar(done, total)} {done:>{len(str(total))}}/{total} {status}".rstrip()


class MetricsFollower:
    """Prints a run's progress from its metrics.jsonl (one JSON row per logged step) as the project's progress lines:
    what a driver shows when the workers' own lines stay off the terminal. A background thread polls the file."""

    def __init__(self, path, label: str, total: int | None, write=print, every_s: float = 1.0):
        import threading
        from pathlib import Path

        self.path, self.label, self.total, self.write, self.every_s = Path(path), label, total, write, every_s
        self.seen = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="metrics-follower", daemon=True)

    def __enter__(self) -> MetricsFollower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.poll()

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        import json

        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        for line in lines[self.seen :]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return  # a line being written: read it next time
            self.seen += 1
            step, status = int(row.get("step", 0)), step_status(row)
            line = (
                progress_line(self.label, step, self.total, status)
                if self.total
                else f"{self.label} step {step} {status}"
            )
            self.write(line)


def step_status(row: dict) -> str:
    """A metrics row as a progress line's status: loss, validation loss, learning rate, tokens/s."""
    parts = []
    if "loss" in row:
        parts.append(f"loss {row['loss']:.3f}")
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.3f}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:.0f} tok/s")
    return " ".join(parts)
