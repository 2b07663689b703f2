"""What to read: sources resolved to files (local, s3/gs, the hub at a pinned commit) and cut into work items
(one parquet row group or one file each), interleaved across sources so that a mixture streams mixed. Runs on
the driver, before any task; listing and footers are read through transient errors (data/retry.py).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chatmusician.data.config import SourceConfig, TokenizeConfig
from chatmusician.data.hub import hub_filesystem, repo_path, resolve_commit
from chatmusician.data.manifest import resolve
from chatmusician.data.retry import RetryCount, RetryPolicy, with_retries

EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".abc": "abc"}
COMPRESSIONS = (".gz", ".bz2", ".zst")  # pyarrow decompresses these streams by extension
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceError(ValueError):
    """A source that cannot be read at all (no files, unknown format): a config error, reported before any work."""


@dataclass(frozen=True)
class WorkItem:
    """One read task: a whole file, or one row group of a parquet file."""

    source: int
    path: str
    format: str
    row_group: int = -1
    first_row: int = 0
    revision: str | None = None
    """Hub: the commit the path reads (``<repo>@<sha>/...``); row ids leave it out."""

    @property
    def row_key(self) -> str:
        """The path in row ids: without the hub commit, so a row keeps its id across revisions."""
        return self.path.replace(f"@{self.revision}", "", 1) if self.revision else self.path


# --- resolving sources ---------------------------------------------------------------------------------------


def is_hub_id(path: str) -> bool:
    """``owner/name`` that is no URI and no existing local path."""
    return "://" not in path and bool(_HUB_ID.match(path)) and not Path(path).exists()


def file_format(path: str) -> str | None:
    name = path.lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    return EXTENSIONS.get(Path(name).suffix)


def source_format(src: SourceConfig) -> str:
    if src.format != "auto":
        return src.format
    return "hub" if is_hub_id(src.path) else "auto"  # "auto" left: decided per file by extension


def filesystem(src: SourceConfig, hub_root: str | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a source: the hub (at ``src.revision``), or a local path or URI
    (s3://, gs://, hdfs://; globs kept) through the one resolver, chatmusician.data.manifest.resolve."""
    if source_format(src) == "hub":
        return hub_filesystem(hub_root), repo_path(src.path, src.revision, hub_root)
    return resolve(src.path)


def retry_policy(cfg: TokenizeConfig) -> RetryPolicy:
    return RetryPolicy(cfg.read_retries, cfg.retry_backoff_s)


def pin(
    cfg: TokenizeConfig, counter: RetryCount | None = None
) -> tuple[TokenizeConfig, list[dict[str, Any]]]:
    """``cfg`` with every hub source's revision resolved to a commit sha (once, here), and what the manifest
    records of each source: path, format, the revision asked for and the commit read."""
    pinned, record = [], []
    for src in cfg.sources:
        commit = None
        if source_format(src) == "hub":
            commit = resolve_commit(src.path, src.revision, cfg.hub_root, retry_policy(cfg), counter)
        pinned.append(replace(src, revision=commit) if commit else src)
        record.append(
            {"path": src.path, "format": source_format(src), "revision": src.revision, "commit": commit}
        )
    return replace(cfg, sources=pinned), record


def list_files(
    fs: pafs.FileSystem, path: str, policy: RetryPolicy = RetryPolicy(0), counter: RetryCount | None = None
) -> list[str]:
    """A file, every readable file under a directory (recursively, hidden and ``_`` files skipped), or a glob."""
    if any(c in path for c in "*?["):
        base = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0] or "/"
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = with_retries(lambda: fs.get_file_info(selector), policy, counter)
        return sorted(i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, path))
    info = with_retries(lambda: fs.get_file_info(path), policy, counter)
    if info.is_file:
        return [path]
    if info.type == pafs.FileType.Directory:
        infos = with_retries(
            lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)), policy, counter
        )
        return sorted(
            i.path
            for i in infos
            if i.is_file
            and file_format(i.path)
            and not any(part.startswith((".", "_")) for part in i.path[len(path) :].split("/"))
        )
    return []


def split_files(files: list[str], split: str) -> list[str]:
    """Hub repos name splits in paths (``data/train-0000.parquet``, ``train/x.jsonl``): keep that split's files."""
    token = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
    chosen = [f for f in files if token.search(f.split("/", 3)[-1])]
    return chosen or files


def plan(cfg: TokenizeConfig, counter: RetryCount | None = None) -> list[WorkItem]:
    """Every source's work items, interleaved round-robin across sources so that a mixture streams mixed.
    Hub sources are read at ``src.revision`` (:func:`pin` resolves it to a commit first)."""
    if not cfg.sources:
        raise SourceError("no sources given: set sources: [{path: ...}]")
    policy = retry_policy(cfg)
    per_source: list[list[WorkItem]] = []
    for i, src in enumerate(cfg.sources):
        fs, path = filesystem(src, cfg.hub_root)
        files = list_files(fs, path, policy, counter)
        if source_format(src) == "hub":
            files = split_files([f for f in files if file_format(f)], src.split)
        if not files:
            raise SourceError(f"source {i} ({src.path!r}): no files found")
        items = []
        for f in files:
            fmt = src.format if src.format not in ("auto", "hub") else file_format(f)
            if fmt is None:
                raise SourceError(
                    f"source {i}: cannot tell the format of {f!r}; set format: parquet|jsonl|json|abc"
                )
            revision = src.revision if source_format(src) == "hub" and cfg.hub_root is None else None
            if fmt == "parquet":
                meta = with_retries(lambda f=f, fs=fs: _footer(fs, f), policy, counter)
                first = 0
                for g in range(meta.num_row_groups):
                    items.append(WorkItem(i, f, fmt, g, first, revision))
                    first += meta.row_group(g).num_rows
            else:
                items.append(WorkItem(i, f, fmt, revision=revision))
        per_source.append(items)
    mixed = []
    for k in range(max(len(items) for items in per_source)):
        mixed += [items[k] for items in per_source if k < len(items)]
    return mixed


def _footer(fs: pafs.FileSystem, path: str):
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


def check_local_sources(cfg: TokenizeConfig) -> None:
    """Before any cluster work: every local source exists and holds readable files (hub and remote sources are
    listed later, by :func:`plan`); SourceError otherwise, saying what to pass."""
    if not cfg.sources:
        raise SourceError("no sources given: pass --config FILE.yaml with sources: [{path: ...}]")
    for i, src in enumerate(cfg.sources):
        if source_format(src) == "hub" or "://" in src.path:
            continue
        fs, path = filesystem(src, cfg.hub_root)
        if not list_files(fs, path):
            what = (
                "does not exist"
                if fs.get_file_info(path).type == pafs.FileType.NotFound
                else "holds no files"
            )
            raise SourceError(
                f"source {i} ({src.path!r}) {what}: pass a file, folder or glob of "
                ".parquet/.jsonl/.json/.abc files, or a hub id owner/name"
            )


def item_dicts(items: list[WorkItem]) -> list[dict[str, Any]]:
    return [asdict(i) for i in items]
