"""Retries with exponential backoff for reads from remote storage (the hub, s3, gs): a 429, a 5xx or a reset
connection is retried, counted, and does not fail the job; a missing file or a refused permission is not.
Retried inside the read (not by re-running a Ray task), so a task never streams the same rows twice."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_STATUS = set(range(400, 500)) - {408, 425, 429}


@dataclass
class RetryCount:
    """Retries made so far (summed into the manifest's ``read_retries``)."""

    count: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    """Retries after the first try."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled after each."""


def is_transient(error: BaseException) -> bool:
    """Worth another try: I/O and connection errors, HTTP 408/425/429 and 5xx; not a missing file, a refused
    permission, a missing hub repo or revision, or another 4xx."""
    if isinstance(error, _PERMANENT) or type(error).__name__.endswith("NotFoundError"):
        return False
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in _PERMANENT_STATUS:
        return False
    return isinstance(error, OSError | TimeoutError | ConnectionError)


def with_retries(fn: Callable[[], T], policy: RetryPolicy, counter: RetryCount | None = None) -> T:
    """``fn()``, tried again after a transient error up to ``policy.attempts`` times, waiting
    ``backoff_s * 2**k`` before retry ``k``; the last error is raised when every try failed."""
    for attempt in range(policy.attempts + 1):
        try:
            return fn()
        except Exception as error:
            if attempt == policy.attempts or not is_transient(error):
                raise
            if counter is not None:
                counter.count += 1
            time.sleep(policy.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def read_lines(
    fs: pafs.FileSystem, path: str, policy: RetryPolicy, counter: RetryCount | None = None
) -> Iterator[bytes]:
    """The lines of a (possibly compressed) file, resumed at the byte after the last whole line when a read
    fails transiently, so a long JSON-lines file is read once even through a flaky connection."""
    offset, attempt = 0, 0
    while True:
        try:
            stream = fs.open_input_stream(path)  # decompresses by extension
            try:
                left = offset  # streams cannot seek: skip what was already read
                while left and (got := len(stream.read(min(left, 1 << 20)))):
                    left -= got
                buffer = b""
                while chunk := stream.read(1 << 20):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        offset += len(line) + 1
                        yield line + b"\n"
                if buffer:
                    offset += len(buffer)
                    yield buffer
                return
            finally:
                stream.close()
        except Exception as error:
            if attempt == policy.attempts or not is_transient(error):
                raise
            if counter is not None:
                counter.count += 1
            time.sleep(policy.backoff_s * 2**attempt)
            attempt += 1
