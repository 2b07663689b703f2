"""The render pipeline with the real tools: musical content, audio, score image, errors, the sandbox, and
hostile inputs (each answered with a structured error or a safe output)."""

from __future__ import annotations

import io
import subprocess
import wave
from pathlib import Path

import mido
import numpy as np
import pytest
from PIL import Image

from chatmusician.render import RenderConfig, RenderRequest, render
from chatmusician.render.config import SandboxConfig
from chatmusician.render.sandbox import run_tool

pytestmark = pytest.mark.integration

NO_SANITIZER = RenderConfig(sanitize_input=False)  # the sandbox alone must hold


def tune(body: str, header: str = "M:4/4\nL:1/4\nQ:1/4=120\nK:C", title: str = "t") -> str:
    return f"X:1\nT:{title}\n{header}\n{body}\n"


def midi_notes(data: bytes, channel: int | None = None) -> list[tuple[float, int]]:
    """(start time in seconds, pitch) of every note-on, in order of time."""
    notes, now = [], 0.0
    for msg in mido.MidiFile(file=io.BytesIO(data)):
        now += msg.time
        if msg.type == "note_on" and msg.velocity > 0 and (channel is None or msg.channel == channel):
            notes.append((round(now, 3), msg.note))
    return notes


def wav_stats(data: bytes) -> tuple[float, float]:
    """(duration in seconds, RMS level in [0, 1]) of a 16-bit PCM WAV."""
    with wave.open(io.BytesIO(data)) as w:
        frames = w.readframes(w.getnframes())
        samples = np.frombuffer(frames, dtype=np.int16).astype(np.float64) / 32768.0
        return w.getnframes() / w.getframerate(), float(np.sqrt(np.mean(samples**2)))


# ------------------------------------------------------------------------------------------------ music
def test_multi_tune_input_renders_the_chosen_tune():
    book = tune("C C C C|]", title="first") + "\n" + tune("G A B c|]", title="second").replace("X:1", "X:7")
    second = render(RenderRequest(book, ["midi", "svg"], tune_index=1))
    assert second.ok, second.errors
    assert [p for _, p in midi_notes(second.outputs["midi"])] == [67, 69, 71, 72]
    assert b">second<" in second.outputs["svg"] and b">first<" not in second.outputs["svg"]
    missing = render(RenderRequest(book, ["midi"], tune_index=5))
    assert not missing.ok and missing.errors[0]["code"] == "tune_index_out_of_range"


def test_pickup_repeats_and_voltas_play_in_order():
    result = render(RenderRequest(tune("G|:c d e f|[1 g a b c':|[2 c' b a g|]"), ["midi"]))
    assert result.ok, result.errors
    pitches = [p for _, p in midi_notes(result.outputs["midi"])]
    # pickup, A part, first ending, A part again, second ending
    assert pitches == [67, 72, 74, 76, 77, 79, 81, 83, 84, 72, 74, 76, 77, 84, 83, 81, 79]
    # 17 quarter notes at 120 bpm
    assert result.duration_s == pytest.approx(17 * 0.5, abs=0.05)


def test_chords_and_chord_symbols_sound_and_print():
    result = render(RenderRequest(tune('"Am"[ACe]2 [ACe]2|"G"G4|]'), ["midi", "svg"]))
    assert result.ok, result.errors
    melody = midi_notes(result.outputs["midi"], channel=0)
    # the written chord sounds together (abc2midi spreads a chord's attacks over a few ms)
    assert sorted(p for t, p in melody if t < 0.05) == [60, 69, 76]
    accompaniment = [n for ch in range(1, 16) for n in midi_notes(result.outputs["midi"], channel=ch)]
    assert accompaniment, "chord symbols should give an accompaniment"
    assert b">Am<" in result.outputs["svg"] and b">G<" in result.outputs["svg"]


def test_several_voices_render_on_their_own_tracks():
    body = "V:1\nc d e f|g4|]\nV:2 clef=bass\nC, D, E, F,|G,4|]"
    result = render(
        RenderRequest(
            tune(body, header="M:4/4\nL:1/4\nQ:1/4=120\nV:1\nV:2 clef=bass\nK:C"), ["midi", "svg", "png"]
        )
    )
    assert result.ok, result.errors
    midi = mido.MidiFile(file=io.BytesIO(result.outputs["midi"]))
    per_track = [sorted({m.note for m in tr if m.type == "note_on" and m.velocity}) for tr in midi.tracks]
    assert [72, 74, 76, 77, 79] in per_track and [48, 50, 52, 53, 55] in per_track
    assert result.outputs["svg"].count(b"<svg") == 1


def test_audio_is_not_silent_and_lasts_what_the_tune_says(tmp_path: Path):
    # 8 quarter notes at 120 bpm: 4 seconds of music
    result = render(RenderRequest(tune("C D E F|G A B c|]"), ["wav", "mp3"]))
    assert result.ok, result.errors
    assert set(result.outputs) == {"wav", "mp3"} and result.duration_s == pytest.approx(4.0, abs=0.05)
    audio_length_s, rms = wav_stats(result.outputs["wav"])
    assert (
        4.0 <= audio_length_s <= result.duration_s + RenderConfig().audio_tail_s + 0.01
    )  # plus the release tail
    assert rms > 0.01
    (tmp_path / "t.mp3").write_bytes(result.outputs["mp3"])
    subprocess.run(["lame", "--quiet", "--decode", "t.mp3", "t.wav"], cwd=tmp_path, check=True)
    mp3_seconds, mp3_rms = wav_stats((tmp_path / "t.wav").read_bytes())
    assert mp3_seconds == pytest.approx(audio_length_s, abs=0.2) and mp3_rms > 0.01


def test_png_shows_the_score(tmp_path: Path):
    from chatmusician.corpora import nottingham_tunes

    result = render(RenderRequest(nottingham_tunes()[0], ["svg", "png"]))
    assert result.ok, result.errors
    (tmp_path / "score.png").write_bytes(result.outputs["png"])  # looked at by eye while writing this test
    image = Image.open(io.BytesIO(result.outputs["png"])).convert("L")
    width, height = image.size
    assert width > 500 and height > 200
    dark = np.asarray(image) < 128
    assert 0.01 < dark.mean() < 0.3  # ink on a white page
    rows_with_ink = dark.any(axis=1).mean()
    assert rows_with_ink > 0.3  # several staves, not one line of text


def test_long_tune_renders_page_by_page_into_one_svg():
    body = "\n".join("|".join(["CDEF GABc"] * 4) + "|" for _ in range(100))  # 400 bars: too long for -g
    result = render(RenderRequest(tune(body, header="M:4/4\nL:1/8\nK:C"), ["svg", "png"]))
    assert result.ok, result.errors
    assert result.outputs["svg"].count(b"<svg") > 2  # an outer SVG holding the pages


def test_tool_errors_with_a_usable_output_are_warnings_with_line_and_column():
    # abc2midi calls this an error, and writes a MIDI with every note: judged by the file, it rendered
    result = render(RenderRequest(tune("C D E F|\nC2/3/4/5 D|]"), ["midi"]))
    assert result.ok and result.outputs["midi"].startswith(b"MThd"), result.errors
    warning = next(w for w in result.warnings if "power of 2" in w["message"])
    assert warning["code"] == "abc2midi_recovered_error" and warning["stage"] == "midi"
    assert warning["line"] == 8 and warning["column"] == 1


def test_unusable_outputs_fail_with_the_reason():
    rests = render(RenderRequest(tune("z4|z4|z4|]"), ["midi", "wav"]))
    assert not rests.ok and "midi" not in rests.outputs
    assert [(e["code"], e["stage"]) for e in rests.errors][:1] == [("bad_midi", "midi")]
    assert "plays no notes" in rests.errors[0]["message"]
    assert any(e["code"] == "no_midi" and e["stage"] == "wav" for e in rests.errors)


def test_recovered_tool_errors_are_warnings_beside_a_good_render():
    result = render(RenderRequest(tune("C- z D E|G4|]"), ["midi", "svg"]))  # a tie to nothing
    assert result.ok and {"midi", "svg"} <= set(result.outputs)
    codes = {(w["code"], w["line"]) for w in result.warnings}
    assert {("abc2midi_recovered_error", 7), ("abcm2ps_recovered_error", 7)} <= codes


# ------------------------------------------------------------------------------------------------ sandbox
@pytest.fixture()
def secret(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.abc"
    path.write_text("T:SECRETMARKER\nK:C\nABCDEFG|\n")
    return path


def test_sandbox_has_no_network_no_outside_files_and_a_private_job_dir(tmp_path: Path, secret: Path):
    probe = (
        "import socket, pathlib\n"
        "s = socket.socket(); s.settimeout(1)\n"
        "try:\n    s.connect(('1.1.1.1', 80)); print('NET')\nexcept OSError: pass\n"
        f"print('READ' if pathlib.Path({str(secret)!r}).exists() else '')\n"
        "print('HOST' if pathlib.Path('/etc/hostname').exists() else '')\n"
        "pathlib.Path('/job/ok').write_text('x')\n"
        "try:\n    pathlib.Path('/usr/evil').write_text('x'); print('WROTE')\nexcept OSError: pass\n"
    )
    run = run_tool(["python3", "-c", probe], tmp_path, SandboxConfig())
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [] and (tmp_path / "ok").read_text() == "x"


def test_sandbox_stops_a_runaway_tool(tmp_path: Path):
    run = run_tool(["sleep", "30"], tmp_path, SandboxConfig(timeout_s=1))
    assert run.timed_out and run.returncode != 0
    big = run_tool(["head", "-c", "5000000", "/dev/zero"], tmp_path, SandboxConfig(file_size_mb=1))
    assert big.returncode == 0  # writing to stdout is not limited …
    write = run_tool(["sh", "-c", "head -c 5000000 /dev/zero > big"], tmp_path, SandboxConfig(file_size_mb=1))
    assert write.returncode != 0 and (tmp_path / "big").stat().st_size <= 2**20  # … files are


@pytest.mark.parametrize("config", [RenderConfig(), NO_SANITIZER], ids=["sanitized", "sandbox-only"])
@pytest.mark.parametrize("directive", ["%%abc-include {path}", "%%format {path}", "I:abc-include {path}"])
def test_include_and_format_directives_leak_nothing(secret: Path, directive: str, config: RenderConfig):
    abc = tune("C D E F|]", header="M:4/4\nL:1/4\n" + directive.format(path=secret) + "\nK:C")
    result = render(RenderRequest(abc, ["midi", "svg"]), config)
    assert {"midi", "svg"} <= set(result.outputs), result.errors  # rendered: the check below reads real files
    for data in result.outputs.values():
        assert b"SECRETMARKER" not in data
    assert b"SECRETMARKER" not in repr(result.errors + result.warnings).encode()


@pytest.mark.parametrize("config", [RenderConfig(), NO_SANITIZER], ids=["sanitized", "sandbox-only"])
def test_raw_svg_and_postscript_blocks_leave_no_script(config: RenderConfig):
    block = (
        "%%beginsvg\n<script>alert('x')</script><foreignObject><iframe src='http://e.example'/></foreignObject>\n"
        "%%endsvg\n%%beginps\n/Times findfont 40 scalefont setfont (PSMARK) show\n%%endps\n"
        '%%beginml\n<img src="x" onerror="alert(1)">\n%%endml'
    )
    result = render(
        RenderRequest(tune("C D E F|]", header="M:4/4\nL:1/4\n" + block + "\nK:C"), ["svg", "png"]), config
    )
    assert {"svg", "png"} <= set(result.outputs), result.errors  # rendered: the check below reads a real SVG
    svg = result.outputs["svg"].lower()
    for bad in (b"<script", b"foreignobject", b"iframe", b"onerror", b"e.example"):
        assert bad not in svg
    assert result.ok or result.errors[0]["code"]


# ------------------------------------------------------------------------------------------------ hostile
HOSTILE = {
    "huge note length": tune("C99999999 C99999999|:C:|"),
    "abc2midi crash input": tune("|:C99999999:|", header="M:4/4\nL:1/8\nK:C"),
    "10,000 bars": tune("\n".join("|".join(["C D E F"] * 10) + "|" for _ in range(1000))),
    "hundreds of voices": tune("\n".join(f"V:{v}\nC D E F|]" for v in range(300))),
    "thousands of tunes": "\n".join(tune("C D E F|]").replace("X:1", f"X:{i}") for i in range(3000)),
    "very slow tempo": tune("C D E F|G A B c|]", header="M:4/4\nL:1/4\nQ:1/4=1\nK:C"),
    "very fast tempo": tune("C D E F|G A B c|]", header="M:4/4\nL:1/4\nQ:1/4=1000000\nK:C"),
    "empty": "",
    "whitespace": "   \n\n\t",
    "binary garbage": bytes(range(256)).decode("latin-1") * 40,
    "1 MB of text": ("X:1\nT:big\nK:C\n" + "CDEF GABc|" * 100_000)[:1_000_000],
}


@pytest.mark.timeout(60)  # a hang guard; each request runs under RenderConfig.request_timeout_s
@pytest.mark.parametrize("config", [RenderConfig(), NO_SANITIZER], ids=["sanitized", "sandbox-only"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_gets_a_structured_error_or_a_safe_output(name: str, config: RenderConfig):
    result = render(RenderRequest(HOSTILE[name], ["midi", "wav", "svg"]), config)
    for error in result.errors:
        assert set(error) == {"code", "message", "line", "column", "stage"}
        assert error["code"] and error["message"]
    if not result.ok:
        assert result.errors
    # whatever came back is bounded: no days-long WAV, no giant files
    assert sum(len(v) for v in result.outputs.values()) < 64 * 2**20
    if "wav" in result.outputs:
        assert wav_stats(result.outputs["wav"])[0] <= RenderConfig().max_audio_s + 10
    assert "<script" not in result.outputs.get("svg", b"").decode("utf-8", "replace").lower()


def test_known_crash_and_days_long_midi_are_named(tmp_path: Path):
    crash = render(RenderRequest(HOSTILE["abc2midi crash input"], ["midi"]), NO_SANITIZER)
    assert (
        not crash.ok and crash.errors[0]["code"] == "tool_crashed" and "SIGABRT" in crash.errors[0]["message"]
    )
    days = render(RenderRequest(HOSTILE["huge note length"], ["midi", "wav", "mp3"]), NO_SANITIZER)
    # a MIDI lasting weeks for two bars is no rendering of the tune: refused, and nothing is synthesised
    assert not days.outputs and "wav" not in days.timings
    assert [(e["stage"], e["code"]) for e in days.errors] == [
        ("midi", "bad_midi"),
        ("wav", "no_midi"),
        ("mp3", "no_midi"),
    ]
    assert "lasts 1573666" in days.errors[0]["message"]


def test_sanitizer_rejects_before_any_tool_runs():
    for name in (
        "10,000 bars",
        "hundreds of voices",
        "thousands of tunes",
        "1 MB of text",
        "huge note length",
    ):
        result = render(RenderRequest(HOSTILE[name], ["midi", "svg"]))
        assert not result.ok, name
        assert {e["stage"] for e in result.errors} == {"sanitize"}, (name, result.errors)
        assert "midi" not in result.timings and "svg" not in result.timings
    empty = render(RenderRequest("", ["midi"]))
    assert [e["code"] for e in empty.errors] == ["empty_input"]


def test_rlimits_sandbox_renders_where_bubblewrap_cannot_run():
    config = RenderConfig(sandbox=SandboxConfig(kind="rlimits"))
    result = render(RenderRequest(tune("C D E F|]"), ["midi", "wav", "svg"]), config)
    assert result.ok and sorted(result.outputs) == ["midi", "svg", "wav"]
    missing = render(RenderRequest(tune("C|]"), ["midi"]), RenderConfig(sandbox=SandboxConfig(kind="nope")))
    assert (
        not missing.ok
        and missing.errors[0]["code"] == "sandbox_unavailable"
        and "nope" in missing.errors[0]["message"]
    )
