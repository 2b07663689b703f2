"""ABC → MIDI (abc2midi) → WAV (fluidsynth) → MP3 (lame), and ABC → SVG (abcm2ps) → PNG (rsvg-convert).

What it supports: any subset of the five formats; one tune picked from a multi-tune input; every tool jailed
(:mod:`chatmusician.render.sandbox`) after the input passed the ABC sanitizer; the SVG sanitized; the MIDI's
length checked before synthesis; long tunes rendered page by page. The audio branch and the score branch run
in two threads (their tools are subprocesses, so the GIL is no bottleneck).

A stage succeeds when its output is usable, judged from the output itself (:mod:`chatmusician.render.judge`: the
MIDI parses, plays notes and lasts about what the tune's bars say; the SVG parses and draws staves), whatever
the tool printed or exited with; the tool's messages come back as warnings with line/column. A timeout or a
crash fails the stage. Every failure is a structured error (``code``, ``message``, ``line``/``column`` within the rendered tune
where the tool gave them, ``stage``); recovered errors and warnings come back beside a successful render.
"""

from __future__ import annotations

import array
import base64
import re
import tempfile
import time
import wave
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatmusician.abc.config import AbcLimits
from chatmusician.render import judge, tools
from chatmusician.render.config import FORMATS, RenderConfig
from chatmusician.render.sandbox import ToolRun, run_tool, sandbox_available
from chatmusician.render.svg import SvgError, join_pages, sanitize_svg, svg_size

AUDIO_FORMATS = ("midi", "wav", "mp3")
SCORE_FORMATS = ("svg", "png")
_X_LINE = re.compile(r"^X:[^\n]*", re.MULTILINE)
_WAV_BYTES_PER_S = 4  # 16-bit stereo


@dataclass
class RenderRequest:
    abc: str
    formats: list[str] = field(default_factory=lambda: ["midi", "svg"])
    tune_index: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> RenderRequest:
        """Build from JSON (``{abc, formats, tune_index}``); types are checked by :func:`render`."""
        if not isinstance(data, dict):
            return cls(abc=data)  # type: ignore[arg-type]  # render() answers with bad_request
        kwargs = {k: data[k] for k in ("abc", "formats", "tune_index") if k in data}
        kwargs.setdefault("abc", None)
        return cls(**kwargs)


@dataclass
class RenderResult:
    ok: bool
    outputs: dict[str, bytes] = field(default_factory=dict)
    """format -> file bytes, for every format that rendered."""
    errors: list[dict] = field(default_factory=list)
    """Each: code, message, line, column, stage (a format or ``request``/``sanitize``/``extract``)."""
    warnings: list[dict] = field(default_factory=list)
    duration_s: float | None = None
    """Length of the music in seconds (from the MIDI), when a MIDI was made."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (midi, wav, mp3, svg, png, total)."""
    tune_index: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-safe form: outputs base64-encoded."""
        return {
            "ok": self.ok,
            "outputs": {fmt: base64.b64encode(data).decode("ascii") for fmt, data in self.outputs.items()},
            "errors": self.errors,
            "warnings": self.warnings,
            "duration_s": self.duration_s,
            "timings": self.timings,
            "tune_index": self.tune_index,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> RenderResult:
        outputs = {fmt: base64.b64decode(b64) for fmt, b64 in data.get("outputs", {}).items()}
        return cls(**{**data, "outputs": outputs})


def issue(code: str, message: str, stage: str, line: int | None = None, column: int | None = None) -> dict:
    return {"code": code, "message": message, "line": line, "column": column, "stage": stage}


@dataclass
class _Branch:
    """What one thread of the pipeline produced."""

    outputs: dict[str, bytes] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None

    def fail_all(self, formats: Iterable[str], code: str, message: str) -> None:
        self.errors += [issue(code, message, fmt) for fmt in formats]


# ----------------------------------------------------------------------------------------------- request
def validate_request(request: RenderRequest) -> list[dict]:
    """Structured ``bad_request`` errors for wrong types or unknown formats (empty list = fine)."""
    errors = []
    if not isinstance(request.abc, str):
        errors.append(
            issue("bad_request", f"'abc' must be a string, got {type(request.abc).__name__}", "request")
        )
    formats = request.formats
    if not isinstance(formats, list | tuple) or not formats or not all(isinstance(f, str) for f in formats):
        errors.append(
            issue("bad_request", f"'formats' must be a non-empty list of {list(FORMATS)}", "request")
        )
    elif unknown := sorted(set(formats) - set(FORMATS)):
        errors.append(
            issue("bad_request", f"unknown formats {unknown}; choose from {list(FORMATS)}", "request")
        )
    if (
        isinstance(request.tune_index, bool)
        or not isinstance(request.tune_index, int)
        or request.tune_index < 0
    ):
        errors.append(issue("bad_request", "'tune_index' must be an integer >= 0", "request"))
    return errors


def _abc_issue(item: Any, stage: str) -> dict:
    data = item.to_dict() if hasattr(item, "to_dict") else dict(item)
    return issue(
        data.get("code", stage), data.get("message", ""), stage, data.get("line"), data.get("column")
    )


def select_tune(
    text: str, tune_index: int, sanitize_input: bool, limits: AbcLimits | None = None
) -> tuple[str | None, list[dict], list[dict]]:
    """Sanitize ``text`` and pick tune ``tune_index``: (tune or None, errors, warnings)."""
    from chatmusician.abc import extract_tunes, sanitize

    errors: list[dict] = []
    warnings: list[dict] = []
    if not text.strip():
        return None, [issue("empty_input", "the input holds no ABC text", "request")], []
    if sanitize_input:
        result = sanitize(text, limits)
        for item in result.issues:
            (errors if item.severity == "error" else warnings).append(_abc_issue(item, "sanitize"))
        if not result.ok:
            if not errors:
                errors.append(issue("rejected_input", "the ABC sanitizer rejected the input", "sanitize"))
            return None, errors, warnings
        text = result.text
    extracted = extract_tunes(text)
    warnings += [_abc_issue(item, "extract") for item in extracted.issues if item.severity == "warning"]
    if not extracted.found or not extracted.tunes:
        errors.append(issue("no_tune", extracted.message or "no ABC tune found in the input", "extract"))
        return None, errors, warnings
    if tune_index >= len(extracted.tunes):
        message = f"tune_index {tune_index} out of range: the input holds {len(extracted.tunes)} tune(s)"
        errors.append(issue("tune_index_out_of_range", message, "request"))
        return None, errors, warnings
    return extracted.tunes[tune_index], errors, warnings


def as_single_tune(tune: str) -> str:
    """The tune numbered ``X:1`` (the number every tool is asked for), ending with a newline."""
    tune = tune.strip("\n")
    tune = _X_LINE.sub("X:1", tune, count=1) if _X_LINE.search(tune) else "X:1\n" + tune
    return tune + "\n"


# ----------------------------------------------------------------------------------------------- judging
def _tool_failure(run: ToolRun, stage: str, tool: str) -> dict | None:
    """A structured error when the tool timed out, was killed or crashed; None otherwise."""
    if run.timed_out:
        return issue("timeout", f"{tool} ran past its {run.seconds:.1f} s limit and was stopped", stage)
    if sig := run.signal_name:
        why = {"SIGXCPU": "CPU-time limit", "SIGXFSZ": "file-size limit", "SIGKILL": "a limit"}.get(sig, "")
        message = f"{tool} was killed by {sig}" + (f" ({why})" if why else " (it crashed on this input)")
        return issue("tool_crashed", message, stage)
    return None


def _messages_to_issues(
    messages: list[tools.ToolMessage], stage: str, tool: str, output_ok: bool
) -> tuple[list[dict], list[dict]]:
    """A tool's messages as (errors, warnings), each with its line/column: when the output is usable every
    message is a warning (an error the tool reported is ``<tool>_recovered_error``); otherwise its errors
    explain why the stage failed."""
    errors, warnings = [], []
    for m in messages:
        if m.severity == "warning":
            warnings.append(issue(f"{tool}_warning", m.message, stage, m.line, m.column))
        elif output_ok:
            warnings.append(issue(f"{tool}_recovered_error", m.message, stage, m.line, m.column))
        else:
            errors.append(issue(f"{tool}_error", m.message, stage, m.line, m.column))
    return errors, warnings


def _no_output(tool: str, what: str, run: ToolRun, errors: list[dict], stage: str) -> list[dict]:
    """The errors of a stage whose tool wrote nothing usable: the tool's own errors when it gave any (with
    their positions), else what it printed last, with its exit status."""
    if errors:
        return errors
    printed = [line for line in (run.stdout + run.stderr).strip().splitlines() if line.strip()]
    said = f"; it printed: {printed[-1].strip()[:300]}" if printed else "; it printed nothing"
    return [issue(f"{tool}_error", f"{tool} wrote no {what} (exit status {run.returncode}){said}", stage)]


def _read_output(path: Path, min_bytes: int = 1) -> bytes | None:
    if path.is_file() and path.stat().st_size >= min_bytes:
        return path.read_bytes()
    return None


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self.end - time.monotonic(), 0.0)


# ----------------------------------------------------------------------------------------------- audio
def midi_length_s(path: Path) -> float:
    import mido

    return float(mido.MidiFile(path).length)


def render_audio(job: Path, wanted: set[str], config: RenderConfig, deadline: _Deadline) -> _Branch:
    """abc2midi, then (if asked) fluidsynth and lame; the MIDI's length is checked before synthesis."""
    out = _Branch()
    synth = [f for f in ("wav", "mp3") if f in wanted]
    start = time.perf_counter()
    run = run_tool(tools.abc2midi_argv("tune.abc", "tune.mid"), job, config.sandbox, deadline.left())
    midi = _read_output(job / "tune.mid", 14)  # a MIDI header chunk alone is 14 bytes
    out.timings["midi"] = time.perf_counter() - start
    if failure := _tool_failure(run, "midi", "abc2midi"):
        out.errors.append(failure)
        out.fail_all(synth, "no_midi", "no audio: the MIDI stage failed")
        return out
    messages = tools.parse_abc2midi(run.stdout)
    problem = None
    if midi is not None:  # judged by the file itself, whatever abc2midi said or exited with
        try:
            length_s, notes = judge.midi_facts(job / "tune.mid")
            problem = judge.midi_problem(length_s, notes, (job / "tune.abc").read_text(encoding="utf-8"))
        except Exception as exc:  # mido raises many kinds on a malformed file
            problem = f"abc2midi wrote an unreadable MIDI: {exc}"
    errors, warnings = _messages_to_issues(messages, "midi", "abc2midi", midi is not None and not problem)
    out.warnings += warnings
    if midi is None or problem:
        out.errors += _no_output("abc2midi", "MIDI", run, errors, "midi") if midi is None else []
        if problem:
            out.errors.append(issue("bad_midi", problem, "midi"))
            out.errors += errors  # the tool's own errors, as the likely why
        out.fail_all(synth, "no_midi", "no audio: the MIDI stage failed")
        return out
    out.duration_s = length_s
    if "midi" in wanted:
        out.outputs["midi"] = midi
    if not synth:
        return out
    if out.duration_s > config.max_audio_s:
        message = f"the music lasts {out.duration_s:.0f} s, over the {config.max_audio_s:.0f} s audio limit"
        out.fail_all(synth, "too_long", message)
        return out
    if out.duration_s <= 0:
        out.fail_all(synth, "silent", "the tune has no notes to play")
        return out
    _synthesise(job, synth, config, deadline, out)
    return out


def _synthesise(job: Path, synth: list[str], config: RenderConfig, deadline: _Deadline, out: _Branch) -> None:
    # Cap the WAV at what this MIDI needs (plus release tail), well below the generic file-size limit.
    wav_mb = int((out.duration_s + 10) * config.sample_rate * _WAV_BYTES_PER_S / 2**20) + 2
    sandbox = type(config.sandbox)(**{**vars(config.sandbox), "file_size_mb": wav_mb})
    start = time.perf_counter()
    argv = tools.fluidsynth_argv(
        config.soundfont, "tune.mid", "tune.wav", config.sample_rate, config.gain, config.reverb_chorus
    )
    extra_ro = [config.soundfont] if not config.soundfont.startswith("/usr/") else []
    run = run_tool(argv, job, sandbox, deadline.left(), env={"SDL_AUDIODRIVER": "dummy"}, read_only=extra_ro)
    failure = _tool_failure(run, "wav", "fluidsynth")
    wav = None
    if not failure and run.returncode == 0 and _read_output(job / "tune.wav", 45):  # more than a bare header
        trim_wav(job / "tune.wav", out.duration_s + config.audio_tail_s)
        wav = _read_output(job / "tune.wav", 45)
    out.timings["wav"] = time.perf_counter() - start
    if failure or wav is None or run.returncode != 0:
        detail = (run.stderr or run.stdout).strip()[-300:] or "no output file"
        out.errors.append(failure or issue("fluidsynth_error", f"fluidsynth made no WAV: {detail}", "wav"))
        if "mp3" in synth:
            out.errors.append(issue("no_wav", "no MP3: the WAV stage failed", "mp3"))
        return
    if "wav" in synth:
        out.outputs["wav"] = wav
    if "mp3" not in synth:
        return
    start = time.perf_counter()
    argv = tools.lame_argv("tune.wav", "tune.mp3", config.mp3_bitrate_kbps, config.mp3_quality)
    run = run_tool(argv, job, config.sandbox, deadline.left())
    mp3 = _read_output(job / "tune.mp3", 100)
    out.timings["mp3"] = time.perf_counter() - start
    failure = _tool_failure(run, "mp3", "lame")
    if failure or mp3 is None or run.returncode != 0:
        detail = (run.stderr or run.stdout).strip()[-300:] or "no output file"
        out.errors.append(failure or issue("lame_error", f"lame made no MP3: {detail}", "mp3"))
        return
    out.outputs["mp3"] = mp3


def trim_wav(path: Path, keep_s: float, fade_s: float = 0.2) -> None:
    """Cut a 16-bit WAV to ``keep_s`` seconds, fading out over the last ``fade_s`` (no click at the cut).

    fluidsynth keeps rendering ~3 s after the last note; the audio should last what the tune says."""
    with wave.open(str(path), "rb") as src:
        params = src.getparams()
        keep = min(params.nframes, int(keep_s * params.framerate))
        if keep >= params.nframes or params.sampwidth != 2:
            return
        samples = array.array("h", src.readframes(keep))
    fade = min(int(fade_s * params.framerate), keep) * params.nchannels
    for i in range(fade):  # linear ramp to 0 on the last `fade` samples
        j = len(samples) - fade + i
        samples[j] = int(samples[j] * (fade - i) / fade)
    with wave.open(str(path), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(samples.tobytes())


# ----------------------------------------------------------------------------------------------- score
def _abcm2ps(job: Path, config: RenderConfig, deadline: _Deadline, pages: bool) -> tuple[ToolRun, list[Path]]:
    for old in job.glob("score*.svg"):
        old.unlink()
    run = run_tool(tools.abcm2ps_argv("tune.abc", "score.svg", pages), job, config.sandbox, deadline.left())
    return run, sorted(job.glob("score[0-9][0-9][0-9].svg"))


def render_score(job: Path, wanted: set[str], config: RenderConfig, deadline: _Deadline) -> _Branch:
    """abcm2ps (one SVG; page mode for long tunes), sanitize, then (if asked) rsvg-convert to PNG."""
    out = _Branch()
    start = time.perf_counter()
    run, files = _abcm2ps(job, config, deadline, pages=False)
    if (
        not files
        and tools.ABCM2PS_BUFFER_FULL.search(run.stderr)
        and not _tool_failure(run, "svg", "abcm2ps")
    ):
        run, files = _abcm2ps(job, config, deadline, pages=True)  # too long for one SVG: one per page
    out.timings["svg"] = time.perf_counter() - start
    wanted_score = [f for f in SCORE_FORMATS if f in wanted]
    if failure := _tool_failure(run, "svg", "abcm2ps"):
        out.errors.append(failure)
        if "png" in wanted:
            out.errors.append(issue("no_svg", "no PNG: the score stage failed", "png"))
        return out
    messages = tools.parse_abcm2ps(run.stderr)
    clean, problem = None, None
    if len(files) > config.max_svg_pages:
        problem = ("too_long", f"the score has {len(files)} pages, over {config.max_svg_pages}")
    elif files:  # judged by the SVG itself: abcm2ps exits 1 after errors it recovered from
        pages = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        if not sum(judge.count_staves(page) for page in pages):
            problem = ("bad_svg", "abcm2ps wrote an SVG with no staves")
        else:
            try:
                clean = sanitize_svg(pages[0]) if len(pages) == 1 else join_pages(pages)
            except SvgError as exc:
                problem = ("bad_svg", str(exc))
    errors, warnings = _messages_to_issues(messages, "svg", "abcm2ps", clean is not None)
    out.warnings += warnings
    if clean is None:
        if problem:
            out.fail_all(wanted_score, *problem)
            out.errors += errors  # the tool's own errors, as the likely why
        else:
            out.errors += _no_output("abcm2ps", "SVG", run, errors, "svg")
            if "png" in wanted:
                out.errors.append(issue("no_svg", "no PNG: the score stage failed", "png"))
        return out
    if clean.removed:
        removed = ", ".join(sorted(set(clean.removed)))
        out.warnings.append(issue("svg_sanitized", f"removed unsafe SVG content: {removed}", "svg"))
    svg = clean.svg.encode("utf-8")
    out.timings["svg"] = time.perf_counter() - start
    if "svg" in wanted:
        out.outputs["svg"] = svg
    if "png" in wanted:
        _rasterise(job, clean.svg, config, deadline, out)
    return out


def _rasterise(job: Path, svg: str, config: RenderConfig, deadline: _Deadline, out: _Branch) -> None:
    start = time.perf_counter()
    (job / "clean.svg").write_text(svg, encoding="utf-8")  # rsvg-convert only ever sees the sanitized SVG
    width, height = svg_size(svg)
    zoom = config.png_zoom
    if width * height * zoom * zoom > config.max_png_pixels:
        zoom = (config.max_png_pixels / (width * height)) ** 0.5
    run = run_tool(tools.rsvg_argv("clean.svg", "score.png", zoom), job, config.sandbox, deadline.left())
    png = _read_output(job / "score.png", 8)
    out.timings["png"] = time.perf_counter() - start
    failure = _tool_failure(run, "png", "rsvg-convert")
    if failure or png is None or run.returncode != 0 or not png.startswith(b"\x89PNG"):
        detail = run.stderr.strip()[-300:] or "no output file"
        out.errors.append(failure or issue("rsvg_error", f"rsvg-convert made no PNG: {detail}", "png"))
        return
    out.outputs["png"] = png


# ----------------------------------------------------------------------------------------------- entry
def render(request: RenderRequest, config: RenderConfig | None = None) -> RenderResult:
    """Render ``request.abc`` (tune ``request.tune_index``) to ``request.formats``; never raises on bad input."""
    config = config or RenderConfig()
    start = time.perf_counter()
    result = RenderResult(
        ok=False, tune_index=request.tune_index if isinstance(request.tune_index, int) else 0
    )
    result.errors = validate_request(request)
    if not result.errors and (why := sandbox_available(config.sandbox)):
        result.errors.append(issue("sandbox_unavailable", why, "request"))
    if result.errors:
        return _finish(result, start)
    deadline = _Deadline(config.request_timeout_s)
    try:
        tune, errors, warnings = select_tune(
            request.abc, request.tune_index, config.sanitize_input, config.limits
        )
        result.errors += errors
        result.warnings += warnings
        if tune is None:
            return _finish(result, start)
        branches = _run_branches(as_single_tune(tune), set(request.formats), config, deadline)
    except Exception as exc:  # a bug or a full disk must still come back as a structured error
        result.errors.append(issue("internal_error", f"{type(exc).__name__}: {exc}", "request"))
        return _finish(result, start)
    for branch in branches:
        result.outputs.update(branch.outputs)
        result.errors += branch.errors
        result.warnings += branch.warnings
        result.timings.update(branch.timings)
        if branch.duration_s is not None:
            result.duration_s = branch.duration_s
    return _finish(result, start)


def _run_branches(tune: str, wanted: set[str], config: RenderConfig, deadline: _Deadline) -> list[_Branch]:
    with tempfile.TemporaryDirectory(prefix="chatmusician-render-") as tmp:
        job = Path(tmp)
        (job / "tune.abc").write_text(tune, encoding="utf-8")
        jobs = []
        if wanted & set(AUDIO_FORMATS):
            jobs.append((render_audio, job, wanted, config, deadline))
        if wanted & set(SCORE_FORMATS):
            jobs.append((render_score, job, wanted, config, deadline))
        if config.parallel_stages and len(jobs) > 1:
            with ThreadPoolExecutor(len(jobs)) as pool:
                return [f.result() for f in [pool.submit(*j) for j in jobs]]
        return [fn(*args) for fn, *args in jobs]


def _finish(result: RenderResult, start: float) -> RenderResult:
    result.timings["total"] = time.perf_counter() - start
    result.ok = not result.errors
    return result


def render_dict(data: Any, config: RenderConfig | None = None) -> dict[str, Any]:
    """JSON in (``{abc, formats, tune_index}``), JSON out (:meth:`RenderResult.to_json_dict`); never raises."""
    try:
        request = RenderRequest.from_dict(data)
    except TypeError as exc:  # unexpected keys are ignored; this is a wrong call shape
        return RenderResult(ok=False, errors=[issue("bad_request", str(exc), "request")]).to_json_dict()
    return render(request, config).to_json_dict()
