"""Stage 9, second half: render a composed tune through the app's ``/v1/render`` (sandboxed abc2midi, abcm2ps,
fluidsynth, ...) into out_dir/render, beside the tune itself."""

from __future__ import annotations

import shutil
from pathlib import Path

from chatmusician.client import ApiError, AppClient
from chatmusician.quickstart.compose import first_parsing

EXTENSIONS = {"midi": "mid"}


def render(app: AppClient, formats: list[str], composed: dict, reference: str, out: Path) -> dict:
    """The first composition that parses (a free one first), or when none does, a reference tune, saying which
    and why; its files in out/render (tune.abc, tune.mid, tune.mp3, ...)."""
    chosen = first_parsing(composed["rows"])
    if chosen is not None:
        abc, source = chosen["abc"], f"composed ({chosen['arm']}) for prompt {chosen['prompt_index'] + 1}"
        reason = None
    else:
        abc, source = reference, "reference tune: the first Nottingham tune"
        reason = f"none of the {len(composed['rows'])} compositions parsed"
    try:
        rendered = app.render(abc, formats)
        ok, errors, outputs = rendered.ok, rendered.errors, rendered.outputs
    except ApiError as err:
        ok, errors, outputs = False, [err.body.get("error") or {"message": err.message}], {}
    render_dir = out / "render"
    shutil.rmtree(render_dir, ignore_errors=True)
    render_dir.mkdir(parents=True)
    (render_dir / "tune.abc").write_text(abc.rstrip() + "\n")
    files = {"abc": str(render_dir / "tune.abc")}
    for fmt, data in outputs.items():
        path = render_dir / f"tune.{EXTENSIONS.get(fmt, fmt)}"
        path.write_bytes(data)
        files[fmt] = str(path)
    return {
        "source": source,
        "fallback_reason": reason,
        "ok": ok,
        "errors": errors,
        "files": files,
        "abc": abc,
    }
