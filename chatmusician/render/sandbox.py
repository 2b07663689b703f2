"""Run one external tool in a jail: bubblewrap (no network, no file system beyond one job directory, no
capabilities, its own PID namespace) + rlimits (CPU time, address space, file size, no core dumps) + a
wall-clock timeout.

docs/TOOLS.md explains why: abc2midi and abcm2ps read arbitrary files through directives, abc2midi crashes on some
inputs, and fluidsynth writes ~27 MB of WAV per second of work. The input sanitizer runs first; this is the
second line of defence, so it is also tested with unsanitized input.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chatmusician.render.config import SandboxConfig

JOB_MOUNT = "/job"
"""Where the job directory appears inside the jail (the tools' working directory)."""
NOBODY = "65534"
# Read-only system paths the tools need: their binaries and libraries, fonts (rsvg-convert) and the
# fontconfig cache (without it fontconfig rescans every font on each run).
_READ_ONLY = ("/usr", "/etc/fonts", "/etc/ld.so.cache", "/var/cache/fontconfig")
_TOP_LEVEL_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": JOB_MOUNT, "TMPDIR": JOB_MOUNT, "LANG": "C.UTF-8"}


@dataclass
class ToolRun:
    """What one sandboxed tool run did."""

    argv: list[str]
    returncode: int | None
    """Exit status; negative = killed by that signal (as in subprocess)."""
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def signal_name(self) -> str | None:
        """``SIGABRT``, ``SIGKILL``, ``SIGXCPU``… when the tool died from a signal."""
        code = self.returncode
        # Shells and `timeout` report a signal death as 128 + N.
        if code is not None and code > 128 and code - 128 in signal.valid_signals():
            code = -(code - 128)
        if code is not None and code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        return None


def bwrap_prefix(job_dir: Path, read_only: Sequence[str] = ()) -> list[str]:
    """The bubblewrap command line that jails a tool into ``job_dir`` (mounted read-write at /job), with the
    system's binaries, libraries and fonts plus ``read_only`` (e.g. a soundfont outside /usr) readable."""
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--uid", NOBODY, "--gid", NOBODY]
    for path in (*_READ_ONLY, *read_only):
        if os.path.exists(path):
            argv += ["--ro-bind", path, path]
    for path in _TOP_LEVEL_LINKS:  # merged-/usr systems link these; others have real folders
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--dev", "/dev", "--proc", "/proc", "--bind", str(job_dir), JOB_MOUNT, "--chdir", JOB_MOUNT]
    return argv


def limits_prefix(config: SandboxConfig, timeout_s: float) -> list[str]:
    """``prlimit`` + ``timeout`` inside the jail, so that the limits bind the tool and not bwrap."""
    mb = 1024 * 1024
    return [
        "prlimit",
        f"--cpu={config.cpu_s}",
        f"--as={config.memory_mb * mb}",
        f"--fsize={config.file_size_mb * mb}",
        f"--nproc={config.max_processes}",
        "--core=0",
        "timeout",
        "--signal=KILL",
        f"{max(timeout_s, 0.1):.2f}",
    ]


def jail_argv(
    argv: list[str], job_dir: Path, config: SandboxConfig, timeout_s: float, read_only: Sequence[str] = ()
) -> list[str]:
    """Full command line for ``argv`` under ``config.kind`` (``bwrap`` or ``rlimits``)."""
    if config.kind == "bwrap":
        return bwrap_prefix(job_dir, read_only) + ["--"] + limits_prefix(config, timeout_s) + argv
    if config.kind == "rlimits":
        return limits_prefix(config, timeout_s) + argv
    raise ValueError(f"unknown sandbox kind {config.kind!r}: expected 'bwrap' or 'rlimits'")


def sandbox_available(config: SandboxConfig) -> str | None:
    """None when the sandbox can run here, else why not."""
    if config.kind not in ("bwrap", "rlimits"):
        return f"unknown sandbox kind {config.kind!r}: expected 'bwrap' or 'rlimits'"
    needed = ["prlimit", "timeout"] + (["bwrap"] if config.kind == "bwrap" else [])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    return f"sandbox tools not installed: {', '.join(missing)}" if missing else None


def run_tool(
    argv: list[str],
    job_dir: str | Path,
    config: SandboxConfig,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    read_only: Sequence[str] = (),
) -> ToolRun:
    """Run ``argv`` (paths relative to the job directory) jailed in ``job_dir``; never raises for the tool's
    own failures: a crash, a limit or the timeout shows in the returned :class:`ToolRun`."""
    job_dir = Path(job_dir).resolve()
    timeout_s = min(config.timeout_s, timeout_s if timeout_s is not None else config.timeout_s)
    full_env = {**_BASE_ENV, **(env or {})}
    if config.kind == "rlimits":
        full_env["HOME"] = full_env["TMPDIR"] = str(job_dir)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            jail_argv(argv, job_dir, config, timeout_s, read_only),
            cwd=job_dir,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            # The inner `timeout` kills the tool; this outer one only catches a wedged jail.
            timeout=timeout_s + 2.0,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        return ToolRun(argv, None, _text(exc.stdout), _text(exc.stderr), True, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    # `timeout --signal=KILL` makes the tool die with SIGKILL (137) when the wall clock runs out.
    timed_out = proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) and seconds >= timeout_s * 0.95
    return ToolRun(argv, proc.returncode, _text(proc.stdout), _text(proc.stderr), timed_out, seconds)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")
