"""Pure parts of the render pipeline: tool message parsing, SVG sanitizing, request checks, command lines."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from chatmusician.render import tools
from chatmusician.render.config import RenderConfig, SandboxConfig
from chatmusician.render.pipeline import RenderRequest, RenderResult, as_single_tune, validate_request
from chatmusician.render.sandbox import ToolRun, jail_argv
from chatmusician.render.svg import SvgError, join_pages, sanitize_svg, svg_size

SVG = "http://www.w3.org/2000/svg"


def _svg(body: str, size: str = 'width="100px" height="50px"') -> str:
    return (
        '<?xml version="1.0" standalone="no"?>\n'
        '<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
        f'<svg xmlns="{SVG}" xmlns:xlink="http://www.w3.org/1999/xlink" {size}>{body}</svg>'
    )


def test_abc2midi_messages_parse_with_1_based_columns_and_recoverable_errors():
    out = (
        "4.84 January 20 2023 abc2midi\n"
        "Error in line-char 7-0 : Malformed note : expecting a-g or A-G\n"
        'Error in line-char 9-4 : Unrecognized chord name "d"\n'
        "Warning in line-char 6-18 : Track 0 Bar 1 has 3 time units while the time signature has 4\n"
        "writing MIDI file tune.mid\n"
    )
    messages = tools.parse_abc2midi(out)
    assert [(m.severity, m.line, m.column, m.recoverable) for m in messages] == [
        ("error", 7, 1, False),
        ("error", 9, 5, True),
        ("warning", 6, 19, False),
    ]
    assert messages[0].message == "Malformed note : expecting a-g or A-G"


def test_abcm2ps_messages_parse_located_and_plain():
    err = (
        "tune.abc:6:13: error: Bad character\n   6 CDEF GABc|cde$ fga|\n                  ^\n"
        "tune.abc:9:2: error: Unknown decoration\n"
        "tune.abc:10:7: warning: Line underfull (225pt of 682pt)\n"
        "error: Output buffer overflow - increase outbufsz\n"
    )
    messages = tools.parse_abcm2ps(err)
    assert [(m.severity, m.line, m.column, m.recoverable) for m in messages] == [
        ("error", 6, 14, True),
        ("error", 9, 3, False),
        ("warning", 10, 8, False),
        ("error", None, None, False),
    ]
    assert tools.ABCM2PS_BUFFER_FULL.search(err)


def test_tool_command_lines_always_name_the_tune_and_the_output():
    assert tools.abc2midi_argv("t.abc", "t.mid") == ["abc2midi", "t.abc", "1", "-o", "t.mid"]
    assert tools.abcm2ps_argv("t.abc", "s.svg")[:2] == ["abcm2ps", "-g"]
    assert tools.abcm2ps_argv("t.abc", "s.svg", pages=True)[:2] == ["abcm2ps", "-v"]
    fs = tools.fluidsynth_argv("/sf.sf2", "t.mid", "t.wav", 22050, 1.0, effects=False)
    assert fs[fs.index("-F") + 1] == "t.wav" and fs[-2:] == ["/sf.sf2", "t.mid"] and "-R" in fs
    assert "-ni" in fs and fs[fs.index("-g") + 1] == "1"


def test_svg_sanitizer_removes_script_foreign_object_handlers_and_external_refs():
    body = (
        '<script>alert(1)</script><g onload="alert(2)" ONCLICK="x()"><path d="M0 0h1"/>'
        "<foreignObject><div xmlns='http://www.w3.org/1999/xhtml'>hi</div></foreignObject>"
        '<use xlink:href="#hd" x="1"/><use xlink:href="http://evil.example/a.svg#x"/>'
        '<use href="javascript:alert(3)"/><a xlink:href="http://evil.example"><text>t</text></a>'
        '<rect style="fill:url(http://evil.example/p)" fill="url(#grad)"/>'
        '<image xlink:href="file:///etc/passwd"/><animate attributeName="href" to="javascript:x"/></g>'
        "<style>@import url(http://evil.example/x.css); .a{fill:red}</style>"
        "<style>.fill {fill: currentColor}</style>"
    )
    clean = sanitize_svg(_svg(body))
    lowered = clean.svg.lower()
    for bad in (
        "script",
        "foreignobject",
        "onload",
        "onclick",
        "evil.example",
        "javascript",
        "<image",
        "<a ",
        "animate",
        "@import",
    ):
        assert bad not in lowered, bad
    root = ET.fromstring(clean.svg)
    uses = root.findall(f".//{{{SVG}}}use")
    assert [u.get("{http://www.w3.org/1999/xlink}href") for u in uses] == ["#hd", None, None]
    assert root.find(f".//{{{SVG}}}rect").get("fill") == "url(#grad)"  # internal refs survive
    assert "currentColor" in clean.svg and root.find(f".//{{{SVG}}}path") is not None
    assert {"element script", "element foreignObject", "attribute onload", "style rule"} <= set(clean.removed)


def test_svg_sanitizer_rejects_entities_and_non_svg():
    bomb = '<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "aaaa">]><svg xmlns="http://www.w3.org/2000/svg">&a;</svg>'
    with pytest.raises(SvgError):
        sanitize_svg(bomb)
    with pytest.raises(SvgError):
        sanitize_svg("<html><script>x</script></html>")
    with pytest.raises(SvgError):
        sanitize_svg("not xml at all <")


def test_join_pages_stacks_pages_and_sanitizes_each():
    pages = [
        _svg('<path d="M0 0"/>'),
        _svg("<script>x</script><text>p2</text>", 'width="120px" height="70px"'),
    ]
    joined = join_pages(pages)
    assert svg_size(joined.svg) == (120.0, 120.0)
    root = ET.fromstring(joined.svg)
    inner = root.findall(f"{{{SVG}}}svg")
    assert [p.get("y") for p in inner] == ["0.00", "50.00"]
    assert "script" not in joined.svg and "element script" in joined.removed


def test_validate_request_reports_each_problem():
    assert validate_request(RenderRequest("X:1\nK:C\nC", ["midi", "png"])) == []
    errors = validate_request(RenderRequest(abc=b"x", formats=["midi", "flac"], tune_index=-1))  # type: ignore[arg-type]
    assert [e["code"] for e in errors] == ["bad_request"] * 3
    assert "flac" in errors[1]["message"] and all(e["stage"] == "request" for e in errors)
    assert validate_request(RenderRequest("x", formats=[]))[0]["code"] == "bad_request"
    assert validate_request(RenderRequest("x", formats="midi"))[0]["code"] == "bad_request"  # type: ignore[arg-type]
    assert validate_request(RenderRequest("x", tune_index=True))[0]["code"] == "bad_request"  # type: ignore[arg-type]


def test_as_single_tune_numbers_it_one():
    assert as_single_tune("X: 17\nT:a\nK:C\nCDE\n\n") == "X:1\nT:a\nK:C\nCDE\n"
    assert as_single_tune("T:a\nK:C\nC") == "X:1\nT:a\nK:C\nC\n"


def test_result_json_round_trip_base64():
    result = RenderResult(ok=True, outputs={"midi": b"MThd\x00"}, duration_s=1.5, timings={"midi": 0.1})
    data = result.to_json_dict()
    assert data["outputs"]["midi"] == base64.b64encode(b"MThd\x00").decode()
    assert RenderResult.from_json_dict(data) == result


def test_jail_command_binds_only_the_job_dir_writable_and_limits_inside(tmp_path: Path):
    cfg = SandboxConfig(cpu_s=3, memory_mb=100, file_size_mb=2)
    argv = jail_argv(["abc2midi", "t.abc"], tmp_path, cfg, 5.0)
    assert argv[0] == "bwrap" and "--unshare-all" in argv and "--die-with-parent" in argv
    binds = [argv[i + 1 : i + 3] for i, a in enumerate(argv) if a == "--bind"]
    assert binds == [[str(tmp_path), "/job"]]  # the only writable mount
    limits = argv[argv.index("--") + 1 :]
    assert limits[:1] == ["prlimit"] and "--cpu=3" in limits and f"--fsize={2 * 2**20}" in limits
    assert limits[-2:] == ["abc2midi", "t.abc"] and "timeout" in limits
    assert jail_argv(["x"], tmp_path, SandboxConfig(kind="rlimits"), 1.0)[0] == "prlimit"
    with pytest.raises(ValueError):
        jail_argv(["x"], tmp_path, SandboxConfig(kind="docker"), 1.0)


def test_tool_run_names_the_killing_signal():
    assert ToolRun([], -6, "", "", False, 0.1).signal_name == "SIGABRT"
    assert ToolRun([], 137, "", "", False, 0.1).signal_name == "SIGKILL"
    assert ToolRun([], 1, "", "", False, 0.1).signal_name is None


def test_render_config_defaults_fit_the_request_budget():
    cfg = RenderConfig()
    assert cfg.request_timeout_s <= 10 and cfg.sandbox.timeout_s <= cfg.request_timeout_s
