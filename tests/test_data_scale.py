"""The data path at scale, shrunk to CI: a MusicPile-shaped corpus of 200,000 rows in 2,000 small row groups
(prose, ABC tunes in the chat template, a few very long rows) becomes a bounded number of shards, which the
trainer's reader then reads for a whole epoch under ``ulimit -n 256``, planned from the manifest alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatmusician.config import load_config
from chatmusician.data.config import TokenizeConfig

pytestmark = pytest.mark.integration

ROWS, GROUP_ROWS, FILES = 200_000, 100, 4


def write_corpus(root) -> int:
    """MusicPile's shape in miniature: mostly short prose and chat-form ABC, one very long row in 2,000."""
    from chatmusician.corpora import nottingham_tunes

    tunes = [t for t in nottingham_tunes()[:50]]
    prose = [f"The {w} is a dance in {m} time. " for w in ("reel", "jig", "hornpipe") for m in ("4/4", "6/8")]
    per_file = ROWS // FILES
    for f in range(FILES):
        texts = []
        for k in range(f * per_file, (f + 1) * per_file):
            if k % 2000 == 7:
                texts.append(prose[k % 6] * 600)  # ~20 k characters: split across rows
            elif k % 3:
                texts.append(prose[k % 6] + str(k))
            else:
                texts.append(f"Human: Write a tune. </s> Assistant: {tunes[k % 50][:80]} </s>")
        pq.write_table(pa.table({"text": texts}), root / f"train-{f:05d}.parquet", row_group_size=GROUP_ROWS)
    return FILES * (per_file // GROUP_ROWS)


READER = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    from chatmusician.data.manifest import shard_plan
    from chatmusician.train.data_order import ShardRowReader
    plan = shard_plan(sys.argv[1])
    reader = ShardRowReader(plan["files"], plan["filesystem"], plan["chunks"], rank=0, world=1,
                            micro_batch_size=64, seed=1, window=4096, columns=("input_ids",))
    rows = tokens = 0
    for batch in reader.batches():
        rows += len(batch["input_ids"])
        tokens += sum(len(r) for r in batch["input_ids"])
        if rows >= reader.micro_per_epoch * 64:
            break
    print(json.dumps({"rows": rows, "tokens": tokens, "files": len(plan["files"])}))
    """
)


def test_a_corpus_of_thousands_of_row_groups_becomes_few_files_read_under_ulimit_256(
    ray_cluster, tiny_model_path, tmp_path
):
    from chatmusician.data.pipeline import write_shards

    (tmp_path / "corpus").mkdir()
    groups = write_corpus(tmp_path / "corpus")
    assert groups == 2000
    out = tmp_path / "shards"
    cfg = load_config(
        TokenizeConfig,
        None,
        sources=[{"path": str(tmp_path / "corpus")}],
        tokenizer=tiny_model_path,
        max_len=256,
        packing="none",
        shard_rows=512,
        output_dir=str(out),
        progress=False,
    )
    manifest = write_shards(cfg)
    rows = manifest["sequences"]
    assert manifest["rows"]["read"] == ROWS and rows > ROWS  # long rows split across several rows
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert len(files) == len(manifest["shards"]) == -(-rows // 512) and len(files) > 256  # > the fd limit
    assert all(s["rows"] == 512 for s in manifest["shards"][:-1])
    # Under ulimit -n 256 the trainer's reader plans from the manifest and reads one whole epoch of every file.
    result = subprocess.run(
        [sys.executable, "-c", READER, str(out)],
        cwd=Path(__file__).resolve().parents[1],  # imports this checkout's chatmusician
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout.strip().splitlines()[-1])
    assert read["files"] == len(files) and read["rows"] == rows // 64 * 64
    assert read["tokens"] <= manifest["tokens"]["input"]
