"""The repository stands alone: a copy of its tracked files in a fresh folder, with no sibling ``shared/``, reads
its tunes, builds the tiny model and tokenizes the quickstart config; and the documented cluster recipe (docs/cluster.md) chains."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Run inside the copy: the copy's package (not the installed one), its config paths, no hub.
IN_CLONE = """
import json, sys
from pathlib import Path
import chatmusician
from chatmusician import corpora
from chatmusician.cli import main
from chatmusician.config import load_config
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.sources import plan, read_item_tables
from chatmusician.data.tokenize import process_batch
from chatmusician.model.loading import load_tokenizer

assert Path(chatmusician.__file__).resolve().is_relative_to(Path.cwd()), chatmusician.__file__
tunes = corpora.nottingham_tunes()
assert main(["build-tiny", "--out_dir", "tiny"]) == 0
cfg = load_config(TokenizeConfig, "configs/tokenize_tiny.yaml", tokenizer="tiny")
rows = sum(t.num_rows for item in plan(cfg) for t in read_item_tables(item, cfg))
first = next(read_item_tables(plan(cfg)[0], cfg))
packed = process_batch(first, load_tokenizer("tiny"), cfg)
print(json.dumps({"tunes": len(tunes), "rows": rows, "packed_rows": packed.num_rows,
                  "row_len": max(len(r) for r in packed["input_ids"].to_pylist())}))
"""


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


@pytest.mark.integration
def test_a_copy_of_the_tracked_files_alone_reads_tunes_builds_and_tokenizes(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.fail("run from a git checkout: the test copies the tracked files")
    clone = tmp_path / "clone"
    for name in tracked_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, clone / name)
    assert not (clone.parent / "shared").exists()
    leaks = []
    for name in tracked_files():
        try:
            text = (clone / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if re.search(r"\.\./shared|/work/shared", text) and name != "tests/test_repo_standalone.py":
            leaks.append(name)
    assert not leaks, f"files that reach outside the repository: {leaks}"

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    env["HOME"] = str(tmp_path / "home")  # no cached tiny model or tokenizer from this machine either
    proc = subprocess.run(
        [sys.executable, "-c", IN_CLONE], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["tunes"] == 1034 and facts["rows"] == 1034
    assert facts["packed_rows"] > 0 and facts["row_len"] <= 512  # tokenize_tiny.yaml: greedy rows of 512


def recipe() -> list[list[str]]:
    text = (ROOT / "docs" / "cluster.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if "ray_jobs." in line]


def flags(argv: list[str]) -> dict[str, str]:
    out = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--") and i + 1 < len(argv):
            out[arg[2:]] = argv[i + 1]
    if "config" in out:  # values the config file sets, unless a flag overrides them
        config = yaml.safe_load((ROOT / out["config"]).read_text())
        nested = {"data.shards": (config.get("data") or {}).get("shards")}
        out = {**{k: str(v) for k, v in config.items() if not isinstance(v, dict | list)}, **nested, **out}
    return out


def test_the_readme_cluster_recipe_chains_each_output_into_the_next_step():
    steps = [(argv[argv.index("-m") + 1].removeprefix("ray_jobs."), flags(argv)) for argv in recipe()]
    assert [job for job, _ in steps] == [
        "tokenize",
        "pretrain",
        "merge",
        "tokenize",
        "sft",
        "merge",
        "evaluate",
    ]
    (_, tok_pt), (_, pretrain), (_, merge_base), (_, tok_sft), (_, sft), (_, merge_chat), (_, evaluate) = (
        steps
    )
    assert tok_pt["mode"] == "pt" and tok_sft["mode"] == "sft"
    assert pretrain["data.shards"] == tok_pt["output_dir"]
    assert merge_base["adapter"].startswith(f"{pretrain['storage_path']}/{pretrain['run_name']}/")
    assert sft["model"] == merge_base["out_dir"]
    assert sft["data.shards"] == tok_sft["output_dir"]
    assert merge_chat["adapter"].startswith(f"{sft['storage_path']}/{sft['run_name']}/")
    assert evaluate["model"] == merge_chat["out_dir"]
