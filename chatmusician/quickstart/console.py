"""The person's terminal and the job's log file.

The terminal gets the job's own lines in one rich style: numbered stage headers, indented details, progress rows
(a live bar on a terminal; one line per logged step elsewhere, so CI logs carry no control codes) and the final
table. Everything else — Ray's and the workers' output, DeepSpeed, the libraries' warnings, child processes —
goes to the log file, by redirecting file descriptors 1 and 2 for the length of the job; the log also gets every
line the terminal does, as plain text.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.console import RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from chatmusician import terminal
from chatmusician.terminal import STYLES


class Console:
    """The real terminal (``stream``: stdout as it was before fds 1 and 2 went to the log) and the ``log`` file."""

    def __init__(self, stream: IO[str], log: IO[str]):
        self.stream, self.log = stream, log
        self.tty = stream.isatty()
        self.term, self.plain = terminal.console(stream), terminal.console(log)

    def say(self, text: str | Text = "", style: str | None = None) -> None:
        """One line on the terminal and in the log; ``style`` a key of STYLES or a rich style."""
        line = text if isinstance(text, Text) else Text(text, style=STYLES.get(style or "", style or ""))
        self.term.print(line)
        self.plain.print(line)

    def stage(self, n: int, total: int, title: str, note: str = "") -> None:
        self.say(Text.assemble((f"[{n}/{total}] ", STYLES["stage"]), (title, "bold"), note))

    def detail(self, text: str, style: str = "detail") -> None:
        self.say("      " + text, style)

    def show(self, renderable: RenderableType) -> None:
        """A table or panel, on the terminal and (as plain text) in the log."""
        terminal.print_whole(self.term, renderable)
        terminal.print_whole(self.plain, renderable)

    def board(self) -> Board:
        return Board(self)


class Board:
    """Progress rows of one stage: live bars on a terminal; otherwise one plain line per milestone. The log gets
    the milestone lines either way."""

    def __init__(self, console: Console):
        self.console, self.rows, self.lock = console, {}, threading.Lock()
        columns = (
            TextColumn("      {task.description:<12}", markup=False),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}", markup=False),
            TimeElapsedColumn(),
        )
        self.live = (  # never redirect sys.stdout: the libraries' prints must keep going to the log
            Progress(*columns, console=console.term, redirect_stdout=False, redirect_stderr=False)
            if console.tty
            else None
        )

    def __enter__(self) -> Board:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.stop()

    def update(self, label: str, done: int, total: int, status: str, milestone: bool = True) -> None:
        with self.lock:
            if self.live:
                if label not in self.rows:
                    self.rows[label] = self.live.add_task(label, total=total, status="")
                self.live.update(self.rows[label], completed=done, status=status)
            if milestone:
                line = Text("      " + terminal.progress_line(label, done, total, status))
                self.console.plain.print(line)
                if not self.live:
                    self.console.term.print(line)

    def note(self, text: str) -> None:
        """A line above the bars (a validation loss, a failure)."""
        self.console.detail(text)


@contextmanager
def console_and_log(path: Path) -> Iterator[Console]:
    """Send fds 1 and 2 (Ray's worker logs echoed to the driver, DeepSpeed, tqdm bars, Ray's own loggers, child
    processes) to ``path``; yield a Console on the real terminal. Restored on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1)  # noqa: SIM115 - closed below
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        yield Console(terminal, log)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        terminal.close()
        log.close()


def quiet_libraries() -> None:
    """No Ray Data cursor-code bars, no per-step Train result dumps in the log either (the job prints its own)."""
    import logging

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Train's placement-group cleaner logs a traceback when the State API is briefly unreachable at shutdown.
    for name in ("ray.train.v2._internal.execution.controller.placement_group_cleaner", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


class StepPrinter:
    """Follows the metrics.jsonl of Train runs (rank 0 writes every step there) on a Board: one row per run,
    advanced every step, a milestone every ``every`` steps; validation losses as notes. ``files`` lists the runs'
    files (those of a sweep's trials appear as they start: rows ``trial 1``, ``trial 2``, ... when ``numbered``)."""

    def __init__(self, console: Console, label: str, files: Callable[[], list[Path]], total: int, every: int,
                 numbered: bool = False):  # fmt: skip
        self.label, self.files, self.total, self.every, self.numbered = label, files, total, every, numbered
        self.board = console.board()
        self.seen: dict[Path, int] = {}
        self.labels: dict[Path, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> StepPrinter:
        self.board.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self._poll()
        self.board.__exit__(*exc)

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            self._poll()

    def _poll(self) -> None:
        for path in self.files():
            if path not in self.labels:
                self.labels[path] = f"{self.label} {len(self.labels) + 1}" if self.numbered else self.label
            label = self.labels[path]
            lines = path.read_text().splitlines() if path.exists() else []
            for line in lines[self.seen.get(path, 0) :]:
                try:
                    row: dict[str, Any] = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line being written: read it next time
                self.seen[path] = self.seen.get(path, 0) + 1
                step = int(row.get("step", 0))
                if "loss" in row:
                    status = (f"loss {row['loss']:.3f} lr {row.get('lr', 0):.2e} "
                              f"{row.get('tokens_per_s', 0):.0f} tok/s")  # fmt: skip
                    milestone = step % self.every == 0 or step == self.total or step == 1
                    self.board.update(label, step, self.total, status, milestone)
                if "val_loss" in row:
                    self.board.note(f"{label} step {step} val_loss {row['val_loss']:.3f}")
