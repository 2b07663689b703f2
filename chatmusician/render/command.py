"""``chatmusician render tune.abc --formats midi,mp3,svg,png --out DIR`` (``-`` reads standard input): the
pipeline on one file; prints one JSON line with the files, errors and warnings (each with line/column)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from chatmusician.render.config import RenderCommandConfig
from chatmusician.render.pipeline import RenderRequest, RenderResult, render

EXTENSIONS = {"midi": "mid", "wav": "wav", "mp3": "mp3", "svg": "svg", "png": "png"}


def parse_formats(formats: str | list[str]) -> list[str]:
    """``"midi, mp3,svg"`` or ``["midi", "mp3"]`` -> ``["midi", "mp3", "svg"]`` (unknown names are left for
    :func:`render` to reject with a structured error)."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    return [f.strip().lower() for f in items if f.strip()]


def write_outputs(result: RenderResult, out_dir: str | Path, stem: str) -> dict[str, str]:
    """Write each output as ``<stem>.<ext>`` and ``<stem>.render.json`` (the result without the bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for fmt, data in result.outputs.items():
        path = out_dir / f"{stem}.{EXTENSIONS[fmt]}"
        path.write_bytes(data)
        files[fmt] = str(path)
    summary = {**result.to_json_dict(), "outputs": files}
    (out_dir / f"{stem}.render.json").write_text(json.dumps(summary, indent=2))
    return files


def run_render(cfg: RenderCommandConfig) -> RenderResult:
    """CLI entry: render, write the files, print the summary as JSON; exit status 1 when any format failed."""
    if cfg.input == "-":
        data, stem = sys.stdin.buffer.read(), "tune"
    else:
        path = Path(cfg.input)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {cfg.input}")
        data, stem = path.read_bytes(), path.stem
    text = data.decode("utf-8", errors="replace")  # bytes that are not UTF-8 reach the sanitizer as U+FFFD
    request = RenderRequest(abc=text, formats=parse_formats(cfg.formats), tune_index=cfg.tune_index)
    result = render(request, cfg.render)
    files = write_outputs(result, cfg.out, stem)
    print(json.dumps({"ok": result.ok, "files": files, "errors": result.errors, "warnings": result.warnings}))
    if not result.ok:
        raise SystemExit(1)
    return result
