"""Hugging Face hub sources pinned to one commit: a branch or tag (default ``main``) is resolved once, on the
driver, to a commit sha; every task then reads ``datasets/<owner>/<name>@<sha>/...`` and the manifest records the
sha, so a re-run with that sha reads the same rows (or fails saying the commit is gone) even after ``main``
moved. Row ids leave the sha out: the same file and row keep their id (and their split and mixture draws)
across revisions.

``hub_root``: a local directory laid out like the hub (``datasets/<owner>/<name>/...``) standing in for it (tests,
offline mirrors); it holds one revision, whose "commit" is a SHA-1 of its files' names and bytes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow.fs as pafs

from chatmusician.data.retry import RetryCount, RetryPolicy, with_retries

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_filesystem(hub_root: str | None) -> pafs.FileSystem:
    """The hub as a pyarrow filesystem whose paths are ``datasets/<owner>/<name>[@<rev>]/...``: the real hub
    (fsspec HfFileSystem, streaming byte ranges, nothing downloaded first) or a local stand-in directory."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if hub_root is None:
        from huggingface_hub import HfFileSystem

        return PyFileSystem(FSSpecHandler(HfFileSystem()))
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    return PyFileSystem(FSSpecHandler(DirFileSystem(path=str(hub_root), fs=LocalFileSystem())))


def repo_path(repo: str, revision: str | None, hub_root: str | None) -> str:
    """Where a dataset repo's files are in :func:`hub_filesystem`: at ``revision`` on the real hub."""
    if hub_root is None and revision:
        return f"datasets/{repo}@{revision}"
    return f"datasets/{repo}"


def standin_commit(hub_root: str, repo: str) -> str:
    """The stand-in's "commit": a SHA-1 over its files' relative paths and contents (it changes when they do)."""
    root = Path(hub_root) / "datasets" / repo
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def resolve_commit(
    repo: str,
    revision: str | None,
    hub_root: str | None,
    policy: RetryPolicy = RetryPolicy(),
    counter: RetryCount | None = None,
) -> str:
    """The commit sha that ``revision`` (branch, tag or sha; None = main) of dataset ``repo`` names now.
    A sha the hub (or stand-in) does not hold is a :class:`~chatmusician.data.sources.SourceError`."""
    from chatmusician.data.sources import SourceError

    if hub_root is not None:
        current = standin_commit(hub_root, repo)
        if revision not in (None, "main", current):
            raise SourceError(
                f"{repo}: revision {revision} is not available (the hub stand-in {hub_root} now holds "
                f"{current}); the data changed since that run"
            )
        return current
    from huggingface_hub import HfApi

    try:
        return with_retries(
            lambda: HfApi().dataset_info(repo, revision=revision or "main").sha, policy, counter
        )
    except Exception as error:
        if type(error).__name__ in ("RevisionNotFoundError", "RepositoryNotFoundError"):
            raise SourceError(f"{repo}: revision {revision or 'main'} is not available on the hub") from error
        raise
