"""The contract between the data stage and the trainer: where shards live, what ``manifest.json`` says, and the
checks a trainer makes before it reads a row. Small on purpose (pyarrow + json; transformers only when a
fingerprint is computed), so the trainer imports it without the Ray Data pipeline.

A shards folder holds ``part-NNNNN.parquet`` files of ``shard_rows`` rows each (the last may be shorter) and a
``manifest.json`` written last (no manifest = an unfinished run). Each manifest shard entry names its file and
its rows, tokens and parquet row groups, so a trainer plans its reads from the manifest alone (:func:`shard_plan`)
instead of opening every file's footer.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
FORMAT_PREFIX = "chatmusician.tokenized/"
MANIFEST_FORMAT = f"{FORMAT_PREFIX}2"  # 2: shards merged to shard_rows files, row groups listed, revisions
VAL_DIR = "val"


class ShardsNotFinished(FileNotFoundError):
    """A shards folder without a manifest: the run that wrote it did not finish (or never ran)."""


class ShardMismatch(ValueError):
    """Shards that do not fit the run that wants to train on them (tokenizer, lengths, mode, format)."""


class Chunk(NamedTuple):
    """One parquet row group of a shard file."""

    file: int
    """Index into the plan's file list."""
    row_group: int
    rows: int


# --- paths -----------------------------------------------------------------------------------------------------


def resolve(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a local path, a ``file://`` path or a URI (``s3://``, ``gs://``,
    ``hdfs://``; a glob in it is kept: the folder above the first wildcard is what gets resolved). With
    ``filesystem`` given, ``path`` is a path inside it (how tests stand in for s3 with a local filesystem)."""
    if filesystem is not None:
        return filesystem, path
    if path.startswith("file://"):
        path = path.removeprefix("file://")
    elif "://" in path:
        # FileSystem.from_uri cannot parse a glob: resolve the folder above the first wildcard
        wildcard = re.search(r"[*?\[]", path)
        prefix = path[: wildcard.start()].rsplit("/", 1)[0] if wildcard else path
        fs, base = pafs.FileSystem.from_uri(prefix)
        return fs, (base.rstrip("/") + path[len(prefix) :] if wildcard else base)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


# --- the manifest ----------------------------------------------------------------------------------------------


def has_manifest(path: str, filesystem: pafs.FileSystem | None = None) -> bool:
    fs, root = resolve(path, filesystem)
    return fs.get_file_info(join(root, MANIFEST)).is_file


def read_manifest(path: str, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """The manifest of a shards folder; :class:`ShardsNotFinished` when it has none."""
    fs, root = resolve(path, filesystem)
    if not fs.get_file_info(join(root, MANIFEST)).is_file:
        raise ShardsNotFinished(
            f"{path}: no {MANIFEST}; the run that wrote it did not finish (re-run chatmusician tokenize)"
        )
    with fs.open_input_stream(join(root, MANIFEST)) as f:
        return json.loads(f.read())


def write_manifest(path: str, manifest: dict[str, Any], filesystem: pafs.FileSystem | None = None) -> None:
    """Written under a temporary name and moved: a reader never sees half a manifest."""
    fs, root = resolve(path, filesystem)
    tmp = join(root, f".{MANIFEST}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    fs.move(tmp, join(root, MANIFEST))


# --- the tokenizer ---------------------------------------------------------------------------------------------


def tokenizer_fingerprint(name_or_path: str, tokenizer: Any = None) -> dict[str, Any]:
    """What identifies a tokenizer's ids: a SHA-256 of the serialized fast tokenizer (vocabulary, merges,
    normalizer, pre-tokenizer: LLaMA's ``legacy`` changes the last), its size, special ids and conventions.
    ``tokenizer``: that tokenizer already loaded, if the caller has it."""
    from chatmusician.model.loading import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
    blob = tok.backend_tokenizer.to_str().encode()
    return {
        "name": name_or_path,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "legacy": bool(getattr(tok, "legacy", False)),
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tok, "add_eos_token", False)),
    }


# --- what a trainer checks and plans ---------------------------------------------------------------------------


def check_shards(
    manifest: dict[str, Any],
    *,
    tokenizer_fingerprint: dict[str, Any],
    max_length: int,
    mode: str | None = None,
    packing: str | None = None,
    where: str = "shards",
) -> None:
    """Do these shards fit this run? :class:`ShardMismatch` with one line naming both sides of every
    mismatch: the manifest's format, tokenizer (hash, vocabulary size), mode and packing (when given), and a
    ``max_len`` longer than the run's ``max_length`` (collate would cut rows). Pure: no I/O."""
    problems = []
    fmt = str(manifest.get("format", ""))
    if fmt != MANIFEST_FORMAT:
        problems.append(f"manifest format {fmt or 'missing'} vs {MANIFEST_FORMAT} this trainer reads")
    tok = manifest.get("tokenizer") or {}
    if tok.get("sha256") != tokenizer_fingerprint.get("sha256"):
        problems.append(
            f"tokenizer sha256 {str(tok.get('sha256'))[:12]} ({tok.get('name')}) vs "
            f"{str(tokenizer_fingerprint.get('sha256'))[:12]} ({tokenizer_fingerprint.get('name')}) of the model"
        )
    if tok.get("vocab_size") != tokenizer_fingerprint.get("vocab_size"):
        problems.append(f"vocab_size {tok.get('vocab_size')} vs {tokenizer_fingerprint.get('vocab_size')}")
    if mode is not None and manifest.get("mode") != mode:
        problems.append(f"mode {manifest.get('mode')} vs {mode}")
    if packing is not None and manifest.get("packing") != packing:
        problems.append(f"packing {manifest.get('packing')} vs {packing}")
    max_len = manifest.get("max_len")
    if not isinstance(max_len, int) or max_len > max_length:
        problems.append(
            f"rows up to max_len {max_len} tokens vs max_length {max_length} (collate would cut them)"
        )
    if problems:
        raise ShardMismatch(
            f"{where} do not fit this run (shards vs run): {'; '.join(problems)}; "
            "re-run chatmusician tokenize with this run's tokenizer and lengths, or change the run"
        )


def shard_plan(path: str, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """What workers need to read a shards folder, from its manifest alone (no footer is read):
    ``{"files": [paths in the filesystem], "filesystem", "chunks": [Chunk], "rows", "manifest"}``.
    :class:`ShardsNotFinished` without a manifest, :class:`ShardMismatch` for one that lists no row groups
    (written before format 2)."""
    fs, root = resolve(path, filesystem)
    manifest = read_manifest(root, fs)
    files, chunks = [], []
    for i, shard in enumerate(manifest.get("shards", [])):
        groups = shard.get("row_groups")
        if groups is None or sum(groups) != shard.get("rows"):
            raise ShardMismatch(
                f"{path}: manifest format {manifest.get('format')} lists no row groups for {shard.get('file')} "
                f"vs {MANIFEST_FORMAT}: re-run chatmusician tokenize"
            )
        files.append(join(root, shard["file"]))
        chunks += [Chunk(i, g, n) for g, n in enumerate(groups)]
    return {
        "files": files,
        "filesystem": fs,
        "chunks": chunks,
        "rows": sum(c.rows for c in chunks),
        "manifest": manifest,
    }


def val_path(path: str, filesystem: pafs.FileSystem | None = None) -> str | None:
    """``<path>/val`` when the data stage wrote a validation split there, else None."""
    return join(path, VAL_DIR) if has_manifest(join(path, VAL_DIR), filesystem) else None


def checked_plan(
    path: str,
    *,
    model: str,
    max_length: int,
    mode: str | None = None,
    packing: str | None = None,
    filesystem: pafs.FileSystem | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """:func:`shard_plan` of ``path`` after :func:`check_shards` against ``model``'s tokenizer (loaded here unless
    ``tokenizer`` is given) and the run's ``max_length``, ``mode`` and ``packing``: what a trainer calls once, on
    the driver, before it starts a worker."""
    plan = shard_plan(path, filesystem)
    fingerprint = tokenizer_fingerprint(model, tokenizer)
    check_shards(
        plan["manifest"],
        tokenizer_fingerprint=fingerprint,
        max_length=max_length,
        mode=mode,
        packing=packing,
        where=f"shards {path}",
    )
    return plan
