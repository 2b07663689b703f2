"""Stages 1-3: the tiny model and its tokenizer, the Nottingham tunes as a pretraining corpus and a text-to-music
SFT set, and Ray Data tokenizing both into parquet shards."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from chatmusician.data.config import SourceConfig, TokenizeConfig


def header_description(tune: str) -> dict[str, str]:
    """The header fields of a tune that the text-to-music task describes (M, L, K, R, T) as label -> value."""
    wanted = {"T": "Title", "M": "Meter", "L": "Note Length", "K": "Key", "R": "Rhythm"}
    found: dict[str, str] = {}
    for line in tune.splitlines():
        m = re.match(r"^([A-Z]):\s*(.*)$", line)
        if m and m.group(1) in wanted and wanted[m.group(1)] not in found and m.group(2).strip():
            found[wanted[m.group(1)]] = m.group(2).strip()
    return found


def write_corpora(tunes: list[str], data_dir: Path) -> tuple[Path, Path]:
    """Nottingham as a pt corpus ({"text"}) and a text-to-music SFT set ({"instruction", "input", "output"})."""
    from chatmusician.prompts import text_to_music

    data_dir.mkdir(parents=True, exist_ok=True)
    pt, sft = data_dir / "pt.jsonl", data_dir / "sft.jsonl"
    with pt.open("w") as f_pt, sft.open("w") as f_sft:
        for i, tune in enumerate(tunes):
            f_pt.write(json.dumps({"text": tune, "src": "nottingham", "id": i}) + "\n")
            row = {"instruction": text_to_music(header_description(tune)), "input": "", "output": tune}
            f_sft.write(json.dumps(row) + "\n")
    return pt, sft


def model_and_corpora(model_size: str, tunes: list[str], out: Path) -> dict[str, str]:
    """The cached tiny LLaMA + tokenizer (built on first use) and the two corpora in out/data."""
    from chatmusician.model.tiny import ensure_tiny

    base = str(ensure_tiny(model_size))
    pt, sft = write_corpora(tunes, out / "data")
    return {"base": base, "pt": str(pt), "sft": str(sft)}


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    rows = manifest["rows"]
    return {"rows_read": rows["read"], "rows_rejected": rows["rejected"], "sequences": manifest["sequences"]}


def tokenize(source: str, mode: str, tokenizer: str, output_dir: Path, max_len: int, **options: Any) -> dict:
    """One Ray Data tokenize stage into ``output_dir``; returns the manifest's headline counts."""
    from chatmusician.data.pipeline import write_shards

    config = TokenizeConfig(sources=[SourceConfig(path=source)], mode=mode, tokenizer=tokenizer, max_len=max_len,
                            output_dir=str(output_dir), **options)  # fmt: skip
    return manifest_summary(write_shards(config))


def tokenize_pt(made: dict[str, str], out: Path, max_len: int) -> dict:
    """The raw tunes, packed greedily into ``max_len`` blocks."""
    return tokenize(made["pt"], "pt", made["base"], out / "shards" / "pt", max_len, packing="greedy")


def tokenize_sft(made: dict[str, str], out: Path, max_len: int, val_fraction: float) -> dict:
    """The instruction rows, a validation split held out; a row longer than ``max_len`` is left out, not cut."""
    return tokenize(made["sft"], "sft", made["base"], out / "shards" / "sft", max_len,
                    max_source_len=max_len // 2, sft_truncate=False, val_fraction=val_fraction)  # fmt: skip
