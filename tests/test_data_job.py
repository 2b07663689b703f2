"""``ray job submit -- python -m ray_jobs.tokenize --config …`` against a real ``ray start --head`` cluster
(own ports, own temp dir, stopped by killing only its own process group), then the shards are checked."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_port, head_port_flags

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_tokenize_job_on_a_ray_start_cluster(tiny_model_path, tmp_path):
    from chatmusician.corpora import nottingham_files

    config = tmp_path / "job.yaml"
    out = tmp_path / "shards"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [{"path": str(nottingham_files()[0]), "format": "abc"}],
                "tokenizer": tiny_model_path,
                "max_len": 256,
                "packing": "greedy",
                "output_dir": str(out),
                "shard_rows": 32,
                "num_tokenizers": 1,
                "progress": False,
            }
        )
    )
    ray_bin = str(Path(sys.executable).with_name("ray"))
    dashboard = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    temp_dir = tempfile.mkdtemp(prefix="cmtok-", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", *head_port_flags(dashboard)],
        env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        address = f"http://127.0.0.1:{dashboard}"
        for _ in range(120):  # wait for the job API
            probe = subprocess.run(
                [ray_bin, "job", "list", "--address", address], env=env, capture_output=True
            )
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--", sys.executable, "-m", "ray_jobs.tokenize",
             "--config", str(config)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=480,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only this cluster's processes (its own session)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    manifest = json.loads((out / "manifest.json").read_text())
    n_tunes = sum(
        line.startswith("X:") for line in nottingham_files()[0].read_text(errors="replace").splitlines()
    )
    assert manifest["rows"]["read"] == manifest["rows"]["written"] == n_tunes
    tables = [pq.read_table(out / s["file"]) for s in manifest["shards"]]
    assert sum(t.num_rows for t in tables) == manifest["sequences"] > 0
    assert tables[0].column_names == ["input_ids", "labels", "position_ids"]
