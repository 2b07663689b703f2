"""The ingestion job on the session's Ray, through the CLI entry: MIDI files, a folder of bad ones and a parquet
column of MIDI bytes in; pt + sft rows and a manifest out; then ``chatmusician tokenize`` reads both unchanged."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatmusician.abc import validate_tune
from chatmusician.config import load_config
from chatmusician.corpora import nottingham_tunes
from chatmusician.data.config import TokenizeConfig
from chatmusician.ingest.report import prepare
from chatmusician.ingest.roundtrip import abc_to_midi
from chatmusician.render.config import SandboxConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def midi_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("midi")
    tunes = nottingham_tunes()[::150][:6]
    midis = [abc_to_midi(prepare(t), SandboxConfig()) for t in tunes]
    (root / "files" / "nested").mkdir(parents=True)
    for k, data in enumerate(midis[:4]):
        (root / "files" / ("nested" if k % 2 else "") / f"tune{k}.mid").write_bytes(data)
    (root / "files" / "notes.txt").write_text("not a MIDI file, and not listed")  # no MIDI extension
    (root / "files" / "broken.mid").write_bytes(b"MThd\x00\x00")  # listed, rejected
    table = pa.table(
        {"midi": pa.array([midis[4], midis[5], b"junk", None], pa.binary()), "name": ["a", "b", "c", "d"]}
    )
    pq.write_table(table, root / "bytes.parquet")
    return root


def test_job_writes_rows_that_tokenize_reads_unchanged(ray_cluster, midi_corpus, tiny_model_path, tmp_path):
    from chatmusician.cli import run_command
    from chatmusician.data.pipeline import write_shards

    out = tmp_path / "ingested"
    config = tmp_path / "ingest.yaml"
    config.write_text(
        json.dumps(
            {
                "sources": [
                    {"path": str(midi_corpus / "files")},
                    {"path": str(midi_corpus / "bytes.parquet"), "column": "midi", "id_column": "name"},
                ],
                "output_dir": str(out),
                "files_per_task": 2,
                "progress": False,
            }
        )
    )
    manifest = run_command("ingest-midi", ["--config", str(config)])
    rows = manifest["rows"]
    assert rows["read"] == 9  # 5 files (notes.txt is not listed) + 4 parquet rows
    assert rows["rejected_by_reason"] == {"empty_file": 1, "not_midi": 2}  # broken.mid, b"junk"; the null
    assert rows["accepted"] == 6 and rows["sft_by_task"] == {"continue": 6, "header": 6}
    assert manifest["gate_means"]["onset_f1"] >= 0.95
    assert json.loads((out / "manifest.json").read_text())["rows"]["accepted"] == 6

    pt = pq.read_table(out / "pt").to_pylist()
    assert [r["id"] for r in pt][-2:] == ["a", "b"] and all(r["src"] == "midi" for r in pt)
    for row in pt:
        assert row["text"].startswith("X:1\n") and "from " not in row["text"] and "\\\n" not in row["text"]
        assert not [i for i in validate_tune(row["text"]) if i.severity == "error"]
    sft = pq.read_table(out / "sft").to_pylist()
    assert len(sft) == 12 and all(r["output"].strip() for r in sft)

    for mode, folder, expected in (("pt", "pt", 6), ("sft", "sft", 12)):
        tokenized = write_shards(
            load_config(
                TokenizeConfig,
                None,
                sources=[{"path": str(out / folder)}],
                mode=mode,
                tokenizer=tiny_model_path,
                max_len=1024,
                max_source_len=768,
                output_dir=str(tmp_path / f"shards-{mode}"),
                num_tokenizers=1,
                progress=False,
            )
        )
        assert tokenized["rows"]["read"] == expected and tokenized["rows"]["rejected"] == 0
        assert tokenized["rows"]["accepted"] == expected and tokenized["tokens"]["loss"] > 0
