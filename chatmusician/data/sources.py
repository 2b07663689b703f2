"""Where rows come from: hub ids, local/remote parquet, jsonl, json and raw ABC files, read row by row (pt
parquet: the same rows from Arrow kernels) with every bad row turned into a reason instead of an exception.
Mixture weights and the verbal:score ratio are per-row, deterministic decisions (a hash of the row id), so they
stream and reproduce.

Everything here is Ray-free: :func:`plan` (data/plan.py) lists work items (one parquet row group or one file) and
:func:`read_item_tables` turns one item into Arrow tables; the pipeline runs it in Ray Data tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chatmusician.data.config import SourceConfig, TokenizeConfig
from chatmusician.data.plan import (  # noqa: F401 - this module's names before the split; callers import them here
    COMPRESSIONS,
    EXTENSIONS,
    SourceError,
    WorkItem,
    check_local_sources,
    file_format,
    filesystem,
    is_hub_id,
    item_dicts,
    list_files,
    pin,
    plan,
    retry_policy,
    source_format,
    split_files,
)
from chatmusician.data.retry import RetryCount, RetryPolicy, read_lines, with_retries
from chatmusician.data.schema import READ_COLUMNS, READ_SCHEMA
from chatmusician.prompts import sft_source_target

REJECT_REASONS = ("missing_field", "not_string", "empty", "invalid_utf8", "too_long", "malformed_json")
SFT_FIELDS = ("instruction", "input", "output")
_TUNE_START = re.compile(rb"(?m)^X:")
# Python's whitespace (what str.isspace and str.strip use), for telling blank texts apart in Arrow kernels
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)
_BLANK_RE2 = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in _WHITESPACE) + "]*$"


# --- reading raw rows -----------------------------------------------------------------------------------------

RawRow = tuple[str, Mapping[str, Any] | str]  # (row id, row fields | reject reason)


def needed_columns(cfg: TokenizeConfig, src: SourceConfig) -> list[str]:
    return [*SFT_FIELDS, "src"] if cfg.mode == "sft" else [src.text_field or cfg.text_field, "src"]


def read_row_group(
    fs: pafs.FileSystem,
    item: WorkItem,
    columns: list[str],
    policy: RetryPolicy = RetryPolicy(0),
    counter: RetryCount | None = None,
) -> pa.Table:
    """The item's row group, with those of ``columns`` that the file has; a transient error retries it."""

    def read():
        with fs.open_input_file(item.path) as f:
            pf = pq.ParquetFile(f)
            present = [c for c in dict.fromkeys(columns) if c in pf.schema_arrow.names]
            return pf.read_row_group(item.row_group, columns=present)

    return with_retries(read, policy, counter)


def iter_parquet(
    fs: pafs.FileSystem, item: WorkItem, columns: list[str], policy: RetryPolicy, counter: RetryCount | None
) -> Iterator[RawRow]:
    table = read_row_group(fs, item, columns, policy, counter)
    present = table.column_names
    # Strings as bytes: invalid UTF-8 from foreign writers must become a reject, not a decode error here.
    values = {}
    for name in present:
        col = table.column(name)
        is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        values[name] = col.cast(pa.large_binary()).to_pylist() if is_text else col.to_pylist()
    for k in range(table.num_rows):
        yield f"{item.row_key}:{item.first_row + k}", {name: v[k] for name, v in values.items()}


def parse_json_line(line: bytes) -> Mapping[str, Any] | str:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "invalid_utf8"
    except ValueError:
        return "malformed_json"
    return row if isinstance(row, dict) else "malformed_json"


def _read_all(fs: pafs.FileSystem, path: str, policy: RetryPolicy, counter: RetryCount | None) -> bytes:
    def read():
        with fs.open_input_stream(path) as f:
            return f.read()

    return with_retries(read, policy, counter)


def _starts_with_bracket(fs: pafs.FileSystem, path: str, policy, counter) -> bool:
    def peek():
        with io.BufferedReader(fs.open_input_stream(path)) as f:
            return f.peek(64).lstrip()[:1] == b"["

    return with_retries(peek, policy, counter)


def iter_json(
    fs: pafs.FileSystem, item: WorkItem, policy: RetryPolicy, counter: RetryCount | None
) -> Iterator[RawRow]:
    """JSON lines (streamed, resumed after a transient error), or one JSON array of objects (``.json`` files
    are either, as on the hub)."""
    if _starts_with_bracket(fs, item.path, policy, counter):
        raw = _read_all(fs, item.path, policy, counter)
        try:
            rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            rows = "invalid_utf8"
        except ValueError:
            rows = "malformed_json"
        if isinstance(rows, str):
            yield f"{item.row_key}:0", rows
            return
        for k, row in enumerate(rows):
            yield f"{item.row_key}:{k}", row if isinstance(row, dict) else "malformed_json"
        return
    for k, line in enumerate(read_lines(fs, item.path, policy, counter)):
        if line.strip():
            yield f"{item.row_key}:{k}", parse_json_line(line)


def iter_abc(
    fs: pafs.FileSystem, item: WorkItem, policy: RetryPolicy, counter: RetryCount | None
) -> Iterator[RawRow]:
    """One row per tune (split at ``X:`` lines), as ``{"text": tune}``."""
    data = _read_all(fs, item.path, policy, counter)
    starts = [m.start() for m in _TUNE_START.finditer(data)]
    for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(data)], strict=True)):
        yield f"{item.row_key}:{k}", {"text": data[a:b].strip()}


def iter_raw_rows(item: WorkItem, cfg: TokenizeConfig, counter: RetryCount | None = None) -> Iterator[RawRow]:
    src = cfg.sources[item.source]
    fs, _ = filesystem(src, cfg.hub_root)
    policy = retry_policy(cfg)
    if item.format == "parquet":
        return iter_parquet(fs, item, needed_columns(cfg, src), policy, counter)
    if item.format in ("jsonl", "json"):
        return iter_json(fs, item, policy, counter)
    if item.format == "abc":
        return iter_abc(fs, item, policy, counter)
    raise SourceError(f"unknown format {item.format!r}")


# --- validating rows ------------------------------------------------------------------------------------------


def as_text(value: Any) -> str | None | tuple[str]:
    """A field as str; ``None`` when missing; a 1-tuple holding the reject reason when unusable."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return ("invalid_utf8",)
    if not isinstance(value, str):
        return ("not_string",)
    try:  # JSON escapes can smuggle lone surrogates, which no tokenizer accepts
        value.encode("utf-8")
    except UnicodeEncodeError:
        return ("invalid_utf8",)
    return value


def validate(
    row: Mapping[str, Any], mode: str, text_field: str, max_chars: int, sft_template: str = "auto"
) -> dict[str, str] | str:
    """Raw row -> ``{"text"}`` (pt) or ``{"source", "target"}`` (sft, see prompts.sft_source_target) plus
    ``src``; or the reject reason."""
    names = SFT_FIELDS if mode == "sft" else (text_field,)
    fields: dict[str, str] = {}
    for name in names:
        value = as_text(row.get(name))
        if isinstance(value, tuple):
            return value[0]
        fields[name] = value if value is not None else ""
        if value is None and (name == "output" or mode == "pt"):
            return "missing_field"
    if mode == "sft" and not (fields["instruction"].strip() or fields["input"].strip()):
        return "missing_field" if row.get("instruction") is None and row.get("input") is None else "empty"
    main = fields["output"] if mode == "sft" else fields[text_field]
    if not main.strip():
        return "empty"
    if sum(len(v) for v in fields.values()) > max_chars:
        return "too_long"
    src = as_text(row.get("src"))
    out = {"src": src if isinstance(src, str) else ""}
    if mode == "sft":
        out["source"], out["target"] = sft_source_target(fields, sft_template)
    else:
        out["text"] = main
    return out


# --- mixture sampling -----------------------------------------------------------------------------------------


def uniform(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) for a row id."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def repeats(key: str, weight: float, seed: int) -> int:
    """How many times a row is used: ``floor(weight)``, plus one more with probability ``frac(weight)``."""
    whole = math.floor(weight)
    if weight == whole:  # no draw needed (and none made: hashing every row id is the read's largest cost)
        return whole
    return whole + (1 if uniform(key, seed) < weight - whole else 0)


def is_score(text: str) -> bool:
    """Does the text hold music in ABC notation (a ``K:`` header line and a bar line)? The verbal/score split."""
    return "|" in text and (text.startswith("K:") or "\nK:" in text)


def is_score_column(texts: pa.Array) -> pa.Array:
    """:func:`is_score` of every text, in Arrow kernels."""
    key_line = pc.or_(pc.starts_with(texts, "K:"), pc.match_substring(texts, "\nK:"))
    return pc.and_(pc.match_substring(texts, "|"), key_line)


def ratio_multipliers(n_verbal: float, n_score: float, ratio: tuple[float, float]) -> tuple[float, float]:
    """Weights (verbal, score) <= 1 that subsample the larger class so that verbal:score matches ``ratio``."""
    want_v, want_s = ratio
    if n_verbal <= 0 or n_score <= 0 or want_v <= 0 or want_s <= 0:
        return 1.0, 1.0
    scale = min(n_verbal / want_v, n_score / want_s)  # the largest mix both classes can supply
    return min(1.0, scale * want_v / n_verbal), min(1.0, scale * want_s / n_score)


# --- the read task --------------------------------------------------------------------------------------------


def read_item(
    item: WorkItem | Mapping[str, Any],
    cfg: TokenizeConfig,
    class_weights: tuple[float, float] = (1.0, 1.0),
    counter: RetryCount | None = None,
) -> Iterator[dict[str, list]]:
    """One work item -> column batches of ``cfg.read_rows`` rows: valid rows carry their text and how many
    times to use them (``repeats``); bad rows carry only their id and ``reject`` reason."""
    item = item if isinstance(item, WorkItem) else WorkItem(**item)
    src = cfg.sources[item.source]
    text_field = src.text_field or cfg.text_field
    batch: dict[str, list] = {c: [] for c in READ_COLUMNS}
    for row_id, raw in iter_raw_rows(item, cfg, counter):
        fields = (
            raw
            if isinstance(raw, str)
            else validate(raw, cfg.mode, text_field, cfg.max_row_chars, cfg.sft_template)
        )
        if isinstance(fields, str):
            fields, reject, score, n = {}, fields, False, 0
        else:
            reject = ""
            score = is_score(fields["target"] if cfg.mode == "sft" else fields["text"])
            weight = src.weight * src.src_weights.get(fields["src"], 1.0) * class_weights[int(score)]
            n = repeats(row_id, weight, cfg.seed)
        for name, value in (("row_id", row_id), ("reject", reject), ("repeats", n), ("is_score", score)):
            batch[name].append(value)
        for name in ("src", "text", "source", "target"):
            batch[name].append(fields.get(name, ""))
        if len(batch["row_id"]) >= cfg.read_rows:
            yield batch
            batch = {c: [] for c in READ_COLUMNS}
    if batch["row_id"]:
        yield batch


def read_item_tables(
    item: WorkItem | Mapping[str, Any],
    cfg: TokenizeConfig,
    class_weights: tuple[float, float] = (1.0, 1.0),
    counter: RetryCount | None = None,
) -> Iterator[pa.Table]:
    """:func:`read_item` as Arrow tables (:data:`READ_SCHEMA`); parquet row groups in pt mode take
    :func:`read_parquet_pt` when they can (the same rows)."""
    item = item if isinstance(item, WorkItem) else WorkItem(**item)
    table = (
        read_parquet_pt(item, cfg, class_weights, counter)
        if item.format == "parquet" and cfg.mode == "pt"
        else None
    )
    if table is not None:
        for start in range(0, table.num_rows, cfg.read_rows):
            yield table.slice(start, cfg.read_rows)
        return
    for batch in read_item(item, cfg, class_weights, counter):
        yield pa.Table.from_pydict(batch, schema=READ_SCHEMA)


def _utf8_column(table: pa.Table, name: str) -> pa.Array | None:
    """Column ``name`` as valid UTF-8 large strings (all null when the file lacks it); None when it holds
    anything else (numbers, invalid UTF-8), which only the per-row path turns into reasons."""
    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.large_string())
    column = table.column(name).combine_chunks()
    text_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    if not any(is_type(column.type) for is_type in text_types):
        return None
    try:
        # casting from binary checks UTF-8; string columns from foreign writers may still hold invalid UTF-8
        column = column.cast(pa.large_string())
        column.validate(full=True)
    except pa.ArrowInvalid:
        return None
    return column


def read_parquet_pt(
    item: WorkItem,
    cfg: TokenizeConfig,
    class_weights: tuple[float, float] = (1.0, 1.0),
    counter: RetryCount | None = None,
) -> pa.Table | None:
    """:func:`read_item` for one parquet row group in pt mode, with Arrow kernels instead of a loop over rows
    (reading was ~10 % of a tokenize task's time): the same rows, reasons and repeats, as one table. None when
    the text or ``src`` column is not valid UTF-8 text, so that the per-row path names the reason."""
    src = cfg.sources[item.source]
    text_field = src.text_field or cfg.text_field
    fs = filesystem(src, cfg.hub_root)[0]
    table = read_row_group(fs, item, [text_field, "src"], retry_policy(cfg), counter)
    text, srcs = _utf8_column(table, text_field), _utf8_column(table, "src")
    if text is None or srcs is None:
        return None
    # validate()'s order: missing, then empty, then too long
    is_missing, is_blank = pc.is_null(text), pc.match_substring_regex(text, _BLANK_RE2)
    is_long = pc.greater(pc.utf8_length(text), cfg.max_row_chars)
    reject = pc.case_when(
        pc.make_struct(is_missing, is_blank, is_long, field_names=["missing", "blank", "long"]),
        "missing_field",
        "empty",
        "too_long",
        "",
    )
    ok = pc.equal(reject, "")
    text = pc.if_else(ok, text, "")  # rejected rows carry only their id and reason
    srcs = pc.if_else(ok, pc.fill_null(srcs, ""), "")
    score = pc.and_(ok, is_score_column(text))
    row_ids = [f"{item.row_key}:{item.first_row + k}" for k in range(table.num_rows)]
    counts = [
        repeats(row_id, src.weight * src.src_weights.get(s, 1.0) * class_weights[c], cfg.seed) if good else 0
        for row_id, s, c, good in zip(
            row_ids, srcs.to_pylist(), score.to_pylist(), ok.to_pylist(), strict=True
        )
    ]
    none = pa.repeat(pa.scalar("", pa.large_string()), table.num_rows)  # pt rows have no source/target
    columns = [row_ids, srcs.cast(pa.string()), reject, pa.array(counts, pa.int32()), score, text, none, none]
    return pa.table(columns, schema=READ_SCHEMA)
