"""Preference votes from the web UI: one JSON line per pick in an append-only, size-bounded file.

A line is a preference pair in the layout TRL and LLaMA-Factory read (``prompt``, ``chosen``, ``rejected``: the
prompt exactly as the model saw it) plus where it came from. Lines are only ever appended (``O_APPEND`` under an
exclusive ``flock``, so Ingress replicas on one host, or on NFS with working locks, never interleave); once the
file would pass its bound the store refuses new votes instead of rotating or overwriting old ones.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any


class VoteStoreFull(Exception):
    """The vote file reached its size bound: nothing was written."""


def vote_record(
    prompt: str, chosen: str, rejected: str, model: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The line stored for one pick; raises ValueError for a pair that teaches nothing."""
    if not chosen.strip() or not rejected.strip():
        raise ValueError("both takes need an answer")
    if chosen == rejected:
        raise ValueError("the two takes are the same: there is nothing to prefer")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "source": "web-ui",
        "model": model,
        "params": params or {},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def append_vote(path: str | Path, record: dict[str, Any], max_bytes: int) -> int:
    """Append ``record`` as one line; returns the file's size after it. Raises VoteStoreFull (writing nothing)
    when the line would take the file past ``max_bytes``."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size + len(line) > max_bytes:
            raise VoteStoreFull(f"the vote file {path} is full ({size} of {max_bytes} bytes)")
        os.write(fd, line)
        return size + len(line)
    finally:
        os.close(fd)  # closing releases the lock


def read_votes(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Every complete, well-formed pair in a vote file, and how many lines were skipped (corrupt or a line a
    crash cut short)."""
    pairs, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                if all(isinstance(row.get(k), str) and row[k] for k in ("prompt", "chosen", "rejected")):
                    pairs.append(row)
                    continue
            except (json.JSONDecodeError, AttributeError):
                pass
            skipped += 1
    return pairs, skipped
