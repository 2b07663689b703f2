"""The project's terminal style off a terminal (CI logs, `ray job logs`): plain text, nothing wrapped."""

import io

from chatmusician import terminal


def test_off_a_terminal_the_console_writes_plain_unwrapped_lines():
    out = io.StringIO()
    console = terminal.console(out)
    table = terminal.table("sweep demo", "trial", "lr")
    table.add_row("a1", "0.001")
    console.print(table)
    path = "/very/long/" + "folder/" * 40 + "model"
    console.print(f"chatmusician chat --model {path}", style="bold")
    text = out.getvalue()
    assert "\x1b[" not in text and f"chatmusician chat --model {path}\n" in text
    assert text.splitlines()[0] == "sweep demo" and "a1" in text and console.width == 120


def test_progress_line_is_the_same_everywhere():
    assert terminal.progress_line("[eval]", 8, 40, "items") == "[eval] [#####...................]  8/40 items"
    assert terminal.progress_line("sft", 90, 80) == "sft [########################] 90/80"  # never past full


def test_table_cells_are_text_not_markup():
    out = io.StringIO()
    table = terminal.table(None, "trial", "target_modules")
    terminal.add_row(table, "a1", "[q_proj, v_proj]")
    terminal.console(out).print(table)
    assert "[q_proj, v_proj]" in out.getvalue()


def test_off_a_terminal_a_wide_table_widens_the_console_instead_of_wrapping_a_cell():
    out = io.StringIO()
    table = terminal.table(None, "trial", *(f"param_{i}" for i in range(8)))
    terminal.add_row(table, "trial_f0153_00000", *["[q_proj, v_proj, k_proj]"] * 8)
    terminal.print_whole(terminal.console(out), table)
    row = out.getvalue().splitlines()[-1]
    assert row.split()[0] == "trial_f0153_00000" and row.count("[q_proj, v_proj, k_proj]") == 8


def test_metrics_follower_prints_each_logged_step_once_and_waits_for_a_half_written_line(tmp_path):
    import json

    from chatmusician.terminal import MetricsFollower

    path, lines = tmp_path / "run" / "metrics.jsonl", []
    follower = MetricsFollower(path, "[sft]", 4, write=lines.append)
    follower.poll()  # no file yet: nothing
    path.parent.mkdir()
    rows = [
        {"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 900.4},
        {"step": 2, "loss": 2.0, "val_loss": 2.25},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    follower.poll()
    follower.poll()
    assert lines == [
        "[sft] [######..................] 1/4 loss 2.500 lr 1.00e-03 900 tok/s",
        "[sft] [############............] 2/4 loss 2.000 val_loss 2.250",
    ]
    path.write_text(path.read_text() + 'ss": 1.5}\n')
    follower.poll()
    assert lines[-1] == "[sft] [##################......] 3/4 loss 1.500" and len(lines) == 3
