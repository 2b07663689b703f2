"""Render latency per format over Nottingham tunes, against the original's path on the same tunes in the same run.

The original ChatMusician demo (model/infer/chatmusician_web_demo_audio.py) ran ``abc2midi`` and then MuseScore
twice on the MIDI (``musescore -f -o x.svg``, ``musescore -f -o x.wav``); here MuseScore 3 makes the SVG and an
MP3. Ours: every tool sandboxed, the SVG sanitized, MIDI+MP3+SVG+PNG. Requests run one at a time (latency, not
throughput). The baseline is skipped, with a message, when ``mscore3`` is not installed.

    .venv/bin/python benchmarks/render.py [--n 100] [--baseline-n 20]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from chatmusician.corpora import nottingham_tunes
from chatmusician.render import RenderConfig, RenderRequest, SandboxConfig, render
from chatmusician.render.pipeline import as_single_tune

SINGLE = ["midi", "wav", "mp3", "svg", "png"]
FULL = ["midi", "mp3", "svg", "png"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def sample(tunes: list[str], n: int) -> list[str]:
    step = max(len(tunes) // n, 1)
    return tunes[::step][:n]


FAILURES: list[str] = []
CPU: dict[str, list[float]] = {"ours": [], "original": []}
"""CPU seconds (this process + every tool) per full render: unlike wall time, barely moved by a busy machine.
Ours is measured in a separate pass with the ``rlimits`` sandbox: bubblewrap's PID namespace hides the tools'
CPU time from getrusage (bwrap's own setup, ~10 ms a tool, is then left out)."""
RLIMITS_ONLY = RenderConfig(sandbox=SandboxConfig(kind="rlimits"))


def cpu_seconds() -> float:
    me, tools = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + tools.ru_utime + tools.ru_stime


def cpu_ours(tune: str) -> None:
    cpu = cpu_seconds()
    render(RenderRequest(tune, FULL), RLIMITS_ONLY)
    CPU["ours"].append(cpu_seconds() - cpu)


def time_ours(tune: str, formats: list[str]) -> float:
    start = time.perf_counter()
    result = render(RenderRequest(tune, formats))
    elapsed = time.perf_counter() - start
    if not result.ok:  # counted and shown; a loaded machine can push a render past its deadline
        FAILURES.append(f"{formats}: {[e['code'] + ' ' + e['message'] for e in result.errors]}")
    return elapsed


def time_original(tune: str, job: Path) -> dict[str, float]:
    """abc2midi, then MuseScore 3 for the SVG and for the MP3, as separate runs (as the original did)."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    (job / "t.abc").write_text(as_single_tune(tune))

    def run(argv: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(argv, cwd=job, env=env, capture_output=True, timeout=120)
        return time.perf_counter() - start

    cpu = cpu_seconds()
    midi = run(["abc2midi", "t.abc", "1", "-o", "t.mid"])
    svg = run(["mscore3", "-f", "-o", "t.svg", "t.mid"])
    mp3 = run(["mscore3", "-f", "-o", "t.mp3", "t.mid"])
    CPU["original"].append(cpu_seconds() - cpu)
    if not (job / "t.mp3").exists() or not list(job.glob("t*.svg")):
        raise RuntimeError("MuseScore made no output")
    for f in job.iterdir():
        f.unlink()
    return {"midi": midi, "svg": midi + svg, "mp3": midi + mp3, "full": midi + svg + mp3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="tunes for our per-format latencies")
    parser.add_argument(
        "--baseline-n", type=int, default=20, help="of those, tunes also run through MuseScore"
    )
    args = parser.parse_args()

    tunes = sample(nottingham_tunes(), args.n)
    time_ours(tunes[0], FULL)  # warm the page cache (tools, soundfont, fonts)
    ours: dict[str, list[float]] = {fmt: [] for fmt in [*SINGLE, "full"]}
    wall = time.perf_counter()
    for tune in tunes:
        for fmt in SINGLE:
            ours[fmt].append(time_ours(tune, [fmt]))
        ours["full"].append(time_ours(tune, FULL))
    wall = time.perf_counter() - wall
    print(
        f"ours over {len(tunes)} Nottingham tunes (every {len(nottingham_tunes()) // args.n}th), {wall:.0f} s"
    )
    print(f"{'format':>6} {'p50 s':>8} {'p95 s':>8}")
    for fmt, values in ours.items():
        label = "full*" if fmt == "full" else fmt
        print(f"{label:>6} {pct(values, 0.5):8.3f} {pct(values, 0.95):8.3f}")
    print("* full = one request for MIDI+MP3+SVG+PNG")
    print(f"failed renders: {len(FAILURES)}" + "".join(f"\n  {f}" for f in FAILURES[:10]))
    if hasattr(os, "getloadavg"):
        print(f"load average after our runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    if shutil.which("mscore3") is None:
        print(
            "\nbaseline skipped: mscore3 (MuseScore 3) is not installed; `apt-get install -y musescore3` to compare"
        )
        return
    base = tunes[: args.baseline_n]
    original: dict[str, list[float]] = {"midi": [], "svg": [], "mp3": [], "full": []}
    with tempfile.TemporaryDirectory() as tmp:
        time_original(base[0], Path(tmp))  # warm MuseScore's files too
        for tune in base:
            for key, value in time_original(tune, Path(tmp)).items():
                original[key].append(value)
            cpu_ours(tune)
    n = len(base)
    print(f"\noriginal's path (abc2midi -> MuseScore 3) vs ours on the same first {n} tunes")
    print(
        f"{'format':>6} {'orig p50':>9} {'orig p95':>9} {'ours p50':>9} {'ours p95':>9} {'speedup p50':>12}"
    )
    for fmt, values in original.items():
        mine = ours[fmt][:n]
        speedup = statistics.median(values) / statistics.median(mine)
        label = "full*" if fmt == "full" else fmt
        print(
            f"{label:>6} {pct(values, 0.5):9.3f} {pct(values, 0.95):9.3f} {pct(mine, 0.5):9.3f} "
            f"{pct(mine, 0.95):9.3f} {speedup:11.1f}x"
        )
    print("* full: original = MIDI+SVG+MP3 (3 runs); ours = MIDI+MP3+SVG+PNG in one sandboxed request")
    mine, theirs = (
        statistics.median(CPU["ours"]),
        statistics.median(CPU["original"][1:]),
    )  # [0]: warm-up
    print(f"CPU s per full render (p50): original {theirs:.3f}, ours {mine:.3f}, ratio {theirs / mine:.1f}x")


if __name__ == "__main__":
    main()
