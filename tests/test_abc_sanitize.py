"""sanitize: forbidden directives stripped, limits enforced, never a crash."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from chatmusician.abc import AbcLimits, extract_tunes, sanitize

TUNE = "X:1\nT:Safe\nM:4/4\nL:1/8\nQ:1/4=120\nK:G\nGABc d2d2|e4 d4|]"


def codes(result):
    return [i.code for i in result.issues]


def test_clean_tune_passes_unchanged():
    result = sanitize(TUNE)
    assert result.ok and result.issues == [] and result.text == TUNE


@pytest.mark.parametrize(
    "directive",
    [
        "%%abc-include /etc/passwd",
        "%%ABC-INCLUDE /etc/passwd",
        "  %%format /etc/passwd",
        "%%EPS /etc/passwd",
        "%%postscript (x) show",
        "%%deco foo 3 bar 0 0 0",
        "%%musicfont url(https://example.invalid/f.woff)",
        "%MIDI ptstress /etc/passwd",
        "%%MIDI ptstress /etc/passwd",
    ],
)
def test_forbidden_directives_are_stripped_with_a_warning(directive):
    result = sanitize(TUNE.replace("K:G", f"{directive}\nK:G"))
    assert result.ok
    assert codes(result) == ["forbidden_directive"]
    assert result.issues[0].severity == "warning" and result.issues[0].line == 6
    assert "passwd" not in result.text and "postscript" not in result.text.lower()
    assert len(result.text.splitlines()) == len(TUNE.splitlines()) + 1  # line numbers kept


def test_harmless_directives_stay():
    text = TUNE.replace("K:G", "%%MIDI program 41\n%%score 1\nK:G")
    assert sanitize(text).text == text


@pytest.mark.parametrize("kind", ["svg", "ps", "ml"])
def test_raw_output_blocks_are_removed_whole(kind):
    block = f"%%begin{kind}\n<script>alert(1)</script>\n<g/>\n%%end{kind}\n"
    result = sanitize(block + TUNE)
    assert "<script>" not in result.text and "%%end" not in result.text
    assert result.text.endswith(TUNE)
    assert codes(result) == ["forbidden_directive"]


def test_unclosed_block_removes_the_rest():
    result = sanitize(TUNE + "\n%%beginsvg\n<script>x</script>")
    assert "<script>" not in result.text
    assert set(codes(result)) == {"forbidden_directive", "unclosed_block"}


def test_instruction_fields_are_stripped():
    text = TUNE.replace("K:G", "I:abc-include /etc/passwd\nK:G").replace("e4 d4", "[I:abc-include x]e4 d4")
    result = sanitize(text)
    assert "I:" not in result.text and "abc-include" not in result.text
    assert codes(result) == ["instruction_field", "instruction_field"]
    assert extract_tunes(result.text).tunes == [TUNE]  # the blanked lines do not come through


@pytest.mark.parametrize(
    ("text", "limits", "code"),
    [
        ("X:1\nK:C\n" + "C" * 300, AbcLimits(max_input_bytes=200), "input_too_large"),
        ("".join(f"X:{n}\nK:C\nC|\n\n" for n in range(1, 22)), AbcLimits(), "too_many_tunes"),
        ("X:1\nK:C\nA9999 B|", AbcLimits(), "note_length_too_long"),
        ("X:1\nK:C\nA/10000 B|", AbcLimits(), "note_length_too_long"),
        ("X:1\nK:C\n[CEG]12345|", AbcLimits(), "note_length_too_long"),
        ("X:1\nQ:1/4=401\nK:C\nC|", AbcLimits(), "tempo_out_of_range"),
        ("X:1\nQ:19\nK:C\nC|", AbcLimits(), "tempo_out_of_range"),
        ("X:1\nK:C\nC [Q:1/4=1000] D|", AbcLimits(), "tempo_out_of_range"),
        ("X:1\nK:C\n" + "C|" * 2001, AbcLimits(), "too_many_bars"),
        ("X:1\nK:C\n" + "".join(f"V:{v}\nC|\n" for v in range(17)), AbcLimits(), "too_many_voices"),
        ("X:1\nK:C\n" + "C" * 10_001, AbcLimits(), "line_too_long"),
    ],
)
def test_limits_reject_with_an_error(text, limits, code):
    result = sanitize(text, limits)
    assert not result.ok
    assert code in codes(result)
    assert all(i.severity == "error" for i in result.issues if i.code == code)


@pytest.mark.parametrize(
    "text",
    [
        "X:1\nK:C\nA999 B|",  # 3 digits: allowed
        "X:1\nQ:1/4=400\nK:C\nC|",
        'X:1\nQ:"Allegro"\nK:C\nC|',  # a tempo without a number
        'X:1\nK:C\n"Gm7 12345"C !12345!D|',  # digits in chord symbols and decorations are no lengths
        "".join(f"X:{n}\nK:C\nC|\n\n" for n in range(1, 21)),
        "X:1\nK:C\n" + "".join(f"V:{v}\nC|\n" for v in range(16)),
    ],
)
def test_within_limits_is_ok(text):
    assert sanitize(text).ok


def test_limits_are_configurable():
    assert sanitize("X:1\nK:C\nA99 B|", AbcLimits(max_note_length_digits=1)).ok is False
    assert sanitize("X:1\nQ:1/4=999\nK:C\nC|", AbcLimits(max_tempo_bpm=1000)).ok


def test_limit_issue_points_at_the_place():
    (issue,) = sanitize("X:1\nK:C\nAB A9999 B|").issues
    assert (issue.code, issue.line, issue.column) == ("note_length_too_long", 3, 5)


def test_oversized_input_is_refused_without_text():
    result = sanitize("X:1\nK:C\n" + "C" * 1_000_000)
    assert not result.ok and result.text == "" and codes(result) == ["input_too_large"]


def test_never_raises_on_garbage():
    rng = random.Random(7)
    binary = os.urandom(50_000).decode("utf-8", errors="surrogateescape")  # lone surrogates too
    assert isinstance(sanitize(binary).ok, bool)
    assert sanitize(os.urandom(1_000_000).decode("latin-1")).ok is False
    alphabet = '%XKQV:|[]"!I0123456789 \nabcABC/=\x00\r'
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 500)))
        result = sanitize(text)
        assert "\x00" not in result.text and "\r" not in result.text


def _abcm2ps_svg(tmp_path, name: str, text: str) -> str:
    (tmp_path / f"{name}.abc").write_text(text)
    subprocess.run(
        ["abcm2ps", "-g", "-O", f"{name}.svg", f"{name}.abc"], cwd=tmp_path, capture_output=True, timeout=30
    )
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"{name}*.svg")))


@pytest.mark.integration
def test_real_abcm2ps_cannot_read_files_or_emit_scripts_after_sanitize(tmp_path):
    """abcm2ps (scripts/setup.sh installs it) with and without sanitize: the unsanitized run shows the threat."""
    secret = tmp_path / "secret.abc"
    secret.write_text("%%text TOPSECRET-9431\n")
    hostile = (
        "X:1\nT:Hostile\n%%beginsvg\n<script>alert('x')</script>\n%%endsvg\n"
        f"%%abc-include {secret}\nK:C\nCDEF|]\n"
    )
    raw = _abcm2ps_svg(tmp_path, "raw", hostile)
    assert "<script>" in raw and "TOPSECRET" in raw
    safe = _abcm2ps_svg(tmp_path, "safe", sanitize(hostile).text)
    assert "Hostile" in safe and "<script>" not in safe and "TOPSECRET" not in safe
