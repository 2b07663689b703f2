"""``chatmusician render``: files per format, a JSON summary, exit status 1 when a format failed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatmusician.cli import main
from chatmusician.render.command import parse_formats

TUNES = (
    "X:1\nT:One\nM:3/4\nL:1/4\nQ:1/4=120\nK:D\nD F A|d3|]\n\n"
    "X:2\nT:Two\nM:4/4\nL:1/8\nQ:1/4=120\nK:G\nGABc dedB|G8|]\n"
)


def test_parse_formats_accepts_commas_spaces_and_lists():
    assert parse_formats("midi, MP3,svg,,png") == ["midi", "mp3", "svg", "png"]
    assert parse_formats(["wav", " png "]) == ["wav", "png"]


@pytest.mark.integration
def test_render_command_writes_every_format(tmp_path: Path, capsys):
    source = tmp_path / "book.abc"
    source.write_text(TUNES)
    out = tmp_path / "out"
    main(
        [
            "render",
            "--input",
            str(source),
            "--formats",
            "midi,mp3,svg,png",
            "--out",
            str(out),
            "--tune_index",
            "1",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["errors"] == []
    names = sorted(p.name for p in out.iterdir())
    assert names == ["book.mid", "book.mp3", "book.png", "book.render.json", "book.svg"]
    assert (out / "book.mid").read_bytes().startswith(b"MThd")
    assert (out / "book.png").read_bytes().startswith(b"\x89PNG")
    assert b">Two<" in (out / "book.svg").read_bytes()
    record = json.loads((out / "book.render.json").read_text())
    assert record["duration_s"] == pytest.approx(4.0, abs=0.05) and record["tune_index"] == 1
    assert record["outputs"]["mp3"] == str(out / "book.mp3")


@pytest.mark.integration
def test_render_command_fails_with_structured_errors(tmp_path: Path):
    source = tmp_path / "bad.abc"
    source.write_text(TUNES)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatmusician.cli",
            "render",
            "--input",
            str(source),
            "--formats",
            "midi,flac",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not summary["ok"] and summary["errors"][0]["code"] == "bad_request"
    assert "flac" in summary["errors"][0]["message"]
    record = json.loads((tmp_path / "bad.render.json").read_text())
    assert record["errors"] == summary["errors"]


@pytest.mark.integration
def test_render_reads_standard_input_as_a_positional_dash_and_prints_its_warnings(
    tmp_path, monkeypatch, capsys
):
    import io

    tie_to_nothing = "X:1\nT:Tie\nM:4/4\nL:1/4\nK:C\nC- z D E|G4|]\n"  # abc2midi and abcm2ps both warn
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tie_to_nothing.encode())))
    assert main(["render", "-", "--out", str(tmp_path), "--formats", "midi,svg"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and sorted(summary["files"]) == ["midi", "svg"]
    assert summary["warnings"] and all(
        {"code", "message", "line", "column"} <= w.keys() for w in summary["warnings"]
    )
    assert {w["line"] for w in summary["warnings"] if w["stage"] == "midi"} == {6}
