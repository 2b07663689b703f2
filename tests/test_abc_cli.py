"""``chatmusician abc-check``: JSON issues per tune, positions in the input file, exit status 1 on errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from chatmusician.abc.check import check_text
from chatmusician.cli import main, run_command

GOOD = "X:1\nT:Good\nM:4/4\nL:1/8\nK:G\nGABc d2B2|c2A2 F2D2|G8|]\n"
BAD = "X:2\nT:Bad key\nM:4/4\nL:1/8\nK:H\nGABc d2B2|c2A2 F2|G8|]\n"


def run(argv, capsys, entry=None) -> tuple[int, list[dict]]:
    """Run in-process; the registry's run_command skips building every other subcommand's parser."""
    try:
        code = main(argv) if entry == "main" else (run_command(argv[0], argv[1:]) and 0)
    except SystemExit as e:
        code = e.code
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_clean_file_exits_0_with_one_report_per_tune(tmp_path, capsys):
    path = tmp_path / "good.abc"
    path.write_text(GOOD + "\n" + GOOD.replace("X:1", "X:5"))
    code, reports = run(["abc-check", "--inputs", f"[{path}]"], capsys, entry="main")
    assert code == 0
    assert [(r["tune"], r["number"], r["ok"], r["issues"]) for r in reports] == [
        (0, 1, True, []),
        (1, 5, True, []),
    ]


def test_errors_exit_1_and_point_at_input_lines(tmp_path, capsys):
    path = tmp_path / "answer.txt"
    path.write_text("Here are two tunes.\n\n" + GOOD + "\nAnd one more:\n" + BAD)
    code, reports = run(["abc-check", "--inputs", f"[{path}]"], capsys)
    assert code == 1
    by_tune = {r["tune"]: r for r in reports}
    assert by_tune[0]["ok"] and not by_tune[1]["ok"]
    issues = {(i["code"], i["line"]) for i in by_tune[1]["issues"]}
    # BAD starts on input line 11 (after the prose, GOOD and a blank line): K:H is line 15, the bars line 16
    assert issues == {("invalid_key", 15), ("bar_duration", 16)}


def test_tune_index_and_limits_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "book.abc"
    path.write_text(GOOD + "\n" + BAD)
    code, reports = run(["abc-check", "--inputs", f"[{path}]", "--tune_index", "0"], capsys)
    assert code == 0 and [r["tune"] for r in reports] == [0]  # 0-based, as render and /v1/render count
    code, reports = run(
        ["abc-check", "--inputs", f"[{path}]", "--tune_index", "0", "--limits.max_tunes", "1"], capsys
    )
    assert code == 1 and reports[0]["tune"] is None and reports[0]["issues"][0]["code"] == "too_many_tunes"
    code, reports = run(["abc-check", "--inputs", f"[{path}]", "--tune_index", "2"], capsys)
    assert code == 1 and reports[-1]["issues"][0]["code"] == "tune_index_out_of_range"


def test_forbidden_directives_are_reported_as_warnings(tmp_path, capsys):
    path = tmp_path / "hostile.abc"
    path.write_text("%%abc-include /etc/passwd\n" + GOOD)
    code, reports = run(["abc-check", "--inputs", f"[{path}]"], capsys)
    assert code == 0
    assert reports[0]["tune"] is None and reports[0]["issues"][0]["code"] == "forbidden_directive"
    assert reports[1]["ok"] and reports[1]["line"] == 2


def test_unreadable_file_and_no_abc_are_structured_errors(tmp_path, capsys):
    prose = tmp_path / "prose.txt"
    prose.write_text("I cannot write music.")
    code, reports = run(["abc-check", "--inputs", f"[{tmp_path / 'missing.abc'}, {prose}]"], capsys)
    assert code == 1
    assert [r["issues"][0]["code"] for r in reports] == ["unreadable_input", "no_abc_found"]


def test_files_are_positional_like_render_and_an_empty_file_is_the_same_error(tmp_path, capsys):
    good, bad, empty = tmp_path / "good.abc", tmp_path / "bad.abc", tmp_path / "empty.abc"
    good.write_text(GOOD)
    bad.write_text(BAD)
    empty.write_text("  \n")
    code, reports = run(["abc-check", str(good), str(bad), "--tune_index", "0"], capsys, entry="main")
    assert code == 1 and [(r["input"], r["ok"]) for r in reports] == [(str(good), True), (str(bad), False)]
    code, reports = run(["abc-check", str(empty)], capsys, entry="main")
    assert code == 1 and reports[0]["issues"][0]["code"] == "empty_input"
    from chatmusician.render.pipeline import RenderRequest, render

    assert [e["code"] for e in render(RenderRequest("  \n")).errors] == ["empty_input"]


def test_stdin_is_read_with_dash(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(GOOD.encode())))
    code, reports = run(["abc-check"], capsys)
    assert code == 0 and reports[0]["input"] == "-" and reports[0]["title"] == "Good"


def test_check_text_is_the_pure_core():
    reports = check_text(BAD)
    assert reports[0]["errors"] == 1 and reports[0]["warnings"] == 1


@pytest.mark.integration
def test_console_script_exit_status(tmp_path):
    path = tmp_path / "bad.abc"
    path.write_text(BAD)
    out = subprocess.run(
        [sys.executable, "-m", "chatmusician.cli", "abc-check", "--inputs", f"[{path}]"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert json.loads(out.stdout.splitlines()[0])["issues"][0]["code"] == "invalid_key"
