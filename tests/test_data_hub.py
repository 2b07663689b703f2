"""Hub sources pinned to one commit and read through transient errors, without Ray and without a network: the
hub is a local stand-in directory (as the pipeline's ``hub_root``), wrapped in a filesystem that fails some
reads the way a 503 or a reset connection does. The tokenize task itself (stages._stage_items) runs here, in
process, so the injected filesystem reaches it."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from chatmusician.config import load_config
from chatmusician.data import plan as plan_module
from chatmusician.data import sources
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.hub import repo_path, standin_commit
from chatmusician.data.retry import RetryCount, RetryPolicy, is_transient, with_retries

REPO = "m-a-p/MusicPile"


class FlakyHub(DirFileSystem):
    """The stand-in hub whose first ``fail_opens`` opens of every file raise a 503, and whose jsonl streams
    break once after ``break_after`` bytes (a reset connection)."""

    def __init__(self, root, fail_opens=1, break_after=None):
        super().__init__(path=str(root), fs=LocalFileSystem(), skip_instance_cache=True)
        self.fail_opens, self.break_after = fail_opens, break_after
        self.opens, self.failures, self.broken = Counter(), 0, False

    def open(self, path, mode="rb", **kw):
        self.opens[path] += 1
        if self.opens[path] <= self.fail_opens:
            self.failures += 1
            raise ConnectionError(f"503 Service Unavailable (injected) {path}")
        data = super().open(path, mode, **kw).read()
        if self.break_after is None or not path.endswith(".jsonl") or self.broken:
            return io.BytesIO(data)
        hub, limit = self, self.break_after

        class Breaking(io.BytesIO):
            def read(self, n=-1):
                if not hub.broken and self.tell() >= limit:
                    hub.broken, hub.failures = True, hub.failures + 1
                    raise ConnectionResetError("connection reset (injected)")
                if not hub.broken and (n is None or n < 0 or self.tell() + n > limit):
                    n = limit - self.tell()
                return super().read(n)

        return Breaking(data)


@pytest.fixture
def hub(tmp_path):
    repo = tmp_path / "hub" / "datasets" / REPO / "data"
    repo.mkdir(parents=True)
    texts = [f"row {k}: X:{k}\nK:G\n|GAB c2d|" if k % 3 else f"prose {k} " * 20 for k in range(40)]
    pq.write_table(
        pa.table({"text": texts, "src": ["x"] * 40}), repo / "train-00000-of-00001.parquet", row_group_size=16
    )
    lines = [json.dumps({"text": f"line {k} " * (k % 7 + 1)}) for k in range(30)]
    (repo / "train-extra.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "hub"


def config(hub, tiny_model_path, **kw):
    base = dict(sources=[{"path": REPO}], hub_root=str(hub), tokenizer=tiny_model_path, max_len=64)
    return load_config(TokenizeConfig, None, **{**base, "retry_backoff_s": 0.0, "val_fraction": 0.3, **kw})


def stage(cfg, tiny_model_path, staging, monkeypatch=None, flaky=None):
    """Pin, plan and run the tokenize task over every item in process: (meta rows, retries, pinned sources)."""
    from chatmusician.data.stages import _stage_items
    from chatmusician.data.tokenize import tokenizer_spec
    from chatmusician.model.loading import load_tokenizer

    if flaky is not None:
        monkeypatch.setattr(
            plan_module, "hub_filesystem", lambda hub_root: PyFileSystem(FSSpecHandler(flaky))
        )
    counter = RetryCount()
    pinned, record = sources.pin(cfg, counter)
    items = [{**i, "index": k} for k, i in enumerate(sources.item_dicts(sources.plan(pinned, counter)))]
    spec = tokenizer_spec(load_tokenizer(tiny_model_path), cfg)
    meta = pa.concat_tables(
        list(_stage_items(pa.Table.from_pylist(items), pinned, (1.0, 1.0), spec, str(staging)))
    )
    return meta, counter.count + sum(meta["retries"].to_pylist()), record


def staged_rows(staging):
    return {
        p.relative_to(staging).as_posix(): pq.read_table(p).to_pylist()
        for p in sorted(staging.rglob("*.parquet"))
    }


def test_transient_errors_are_retried_counted_and_change_no_row(hub, tiny_model_path, tmp_path, monkeypatch):
    cfg = config(hub, tiny_model_path)
    meta, retries, _ = stage(cfg, tiny_model_path, tmp_path / "clean")
    assert retries == 0
    flaky = FlakyHub(hub, fail_opens=1, break_after=200)
    meta_flaky, retries, _ = stage(cfg, tiny_model_path, tmp_path / "flaky", monkeypatch, flaky)
    # a 503 on the first open of each file (parquet footer, jsonl) and a connection reset inside the jsonl stream
    assert flaky.failures == 3 and flaky.broken and retries == flaky.failures  # each retried and counted
    assert staged_rows(tmp_path / "flaky") == staged_rows(tmp_path / "clean")  # the same rows, none twice
    assert meta_flaky["stats"].to_pylist() == meta["stats"].to_pylist()
    assert {json.loads(s)["item"] for s in meta["staged"].to_pylist() if s} == {
        0,
        1,
        2,
        3,
    }  # 3 row groups + 1 file
    assert {r["split"] for r in meta.to_pylist() if r["staged"]} == {"train", "val"}  # both splits, one read


def test_a_source_that_keeps_failing_fails_after_the_retries(hub, tiny_model_path, tmp_path, monkeypatch):
    cfg = config(hub, tiny_model_path, read_retries=2)
    with pytest.raises(ConnectionError, match="503"):
        stage(cfg, tiny_model_path, tmp_path / "s", monkeypatch, FlakyHub(hub, fail_opens=3))


def test_retries_only_what_may_pass_and_back_off_exponentially(monkeypatch):
    waits = []
    monkeypatch.setattr("chatmusician.data.retry.time.sleep", waits.append)
    calls, counter = [], RetryCount()

    def twice_then_ok():
        calls.append(1)
        if len(calls) <= 2:
            raise TimeoutError("read timed out")
        return "ok"

    assert with_retries(twice_then_ok, RetryPolicy(5, 0.5), counter) == "ok"
    assert counter.count == 2 and waits == [0.5, 1.0]
    with pytest.raises(FileNotFoundError):
        with_retries(lambda: open("/nonexistent/x"), RetryPolicy(5, 0.5), counter)
    assert counter.count == 2  # a missing file is not retried

    class HTTPError(OSError):
        def __init__(self, status):
            super().__init__(status)
            self.response = type("R", (), {"status_code": status})()

    assert is_transient(HTTPError(429)) and is_transient(HTTPError(503)) and not is_transient(HTTPError(404))
    assert not is_transient(ValueError("bad row")) and is_transient(ConnectionResetError())


def test_hub_sources_are_pinned_and_a_changed_hub_says_so(hub, tiny_model_path, tmp_path):
    cfg = config(hub, tiny_model_path)
    pinned, record = sources.pin(cfg)
    commit = record[0]["commit"]
    assert record == [{"path": REPO, "format": "hub", "revision": None, "commit": commit}]
    assert commit == standin_commit(str(hub), REPO) and len(commit) == 40
    again = sources.pin(config(hub, tiny_model_path, sources=[{"path": REPO, "revision": commit}]))[1]
    assert again[0]["commit"] == commit and again[0]["revision"] == commit
    # The dataset changes (a new revision): the old commit is refused, the branch reads the new one.
    extra = hub / "datasets" / REPO / "data" / "train-00001-of-00001.parquet"
    pq.write_table(pa.table({"text": ["new row"]}), extra)
    with pytest.raises(sources.SourceError, match=f"revision {commit} is not available"):
        sources.pin(config(hub, tiny_model_path, sources=[{"path": REPO, "revision": commit}]))
    assert sources.pin(cfg)[1][0]["commit"] not in (None, commit)


def test_the_real_hub_reads_at_the_commit_and_row_ids_leave_it_out():
    sha = "0123456789abcdef0123456789abcdef01234567"
    path = repo_path(REPO, sha, hub_root=None)
    assert path == f"datasets/{REPO}@{sha}"
    item = sources.WorkItem(0, f"{path}/data/train-0.parquet", "parquet", 0, 0, sha)
    assert item.row_key == f"datasets/{REPO}/data/train-0.parquet"
    assert repo_path(REPO, None, hub_root=None) == f"datasets/{REPO}"
