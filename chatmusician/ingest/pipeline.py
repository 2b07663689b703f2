"""MIDI -> ABC training rows as a Ray Data job.

    plan (work items: MIDI files in groups, or parquet row groups of MIDI bytes)
      -> one stage of tasks, per MIDI: read + clean (ingest.midi) -> midi2abc, jailed (ingest.convert)
         -> normalise -> validator + abc2midi round trip against the cleaned input (ingest.roundtrip)
         -> a MusicPile pt row (``text``) and MusicPile-sft rows (ingest.tasks), or a reject reason
      -> the driver writes pt/ and sft/ parquet files + manifest.json (rows, rejects by reason, gate figures)

``chatmusician tokenize`` reads ``<output_dir>/pt`` (mode pt) and ``<output_dir>/sft`` (mode sft) unchanged.
:func:`ingest_one` is the whole per-file work and needs no Ray (the report script calls it directly).
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chatmusician.abc import ERROR, validate_tune
from chatmusician.config import to_dict
from chatmusician.ingest.config import IngestConfig, MidiSourceConfig
from chatmusician.ingest.convert import ConvertError, run_midi2abc
from chatmusician.ingest.midi import MidiReject, read_score, to_midi
from chatmusician.ingest.roundtrip import gate
from chatmusician.ingest.tasks import sft_rows
from chatmusician.render.sandbox import sandbox_available

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "chatmusician.ingest_midi/1"
PT_SCHEMA = pa.schema([("text", pa.large_string()), ("src", pa.string()), ("id", pa.string())])
SFT_SCHEMA = pa.schema(
    [
        ("instruction", pa.large_string()),
        ("input", pa.large_string()),
        ("output", pa.large_string()),
        ("src", pa.string()),
        ("id", pa.string()),
        ("task", pa.string()),
    ]
)
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("abc", pa.large_string()),
        ("metrics", pa.string()),
        ("sft", pa.large_string()),
    ]
)


class SourceError(ValueError):
    """A source that cannot be read at all (nothing found, a missing column): a config error, before any work."""


# --- one file -------------------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    id: str
    reason: str = ""
    """"" when accepted, else the reject reason."""
    message: str = ""
    abc: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    sft: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reason


def ingest_one(data: bytes | None, row_id: str, cfg: IngestConfig) -> IngestResult:
    """One MIDI file's bytes -> an accepted tune (ABC, gate figures, SFT rows) or a reject reason. Never raises
    for the file's own faults."""
    start = time.perf_counter()
    result = IngestResult(row_id)
    try:
        if data is None:
            raise MidiReject("empty_file", "no bytes (a null parquet value)")
        score = read_score(bytes(data), cfg.clean)
        result.metrics.update(
            voices=len(score.parts),
            notes=sum(len(p.notes) for p in score.parts),
            snapped=score.snapped,
            swung=score.swung,
            pickup_beats=score.pickup_beats,
            meter_from_file=score.meter_from_file,
            key_from_file=bool(score.keys),
        )
        midi = to_midi(score)
        reject = None
        for unit, attempt in _attempts(cfg):  # the first whose round trip passes the gate
            try:
                abc = result.abc = _convert_and_gate(midi, score, unit, attempt, result.metrics)
                reject = None
                break
            except MidiReject as exc:
                if exc.reason not in ("low_agreement", "bad_bars", "invalid_abc"):
                    raise
                reject = reject or exc  # the first unit's verdict is the one reported
        if reject is not None:
            raise reject
        if cfg.gate.render_check:
            _render_check(abc, cfg)
        result.sft = sft_rows(abc, cfg.sft.tasks, cfg.sft.continue_fraction, cfg.sft.min_bars)
    except (MidiReject, ConvertError) as exc:
        result.reason, result.message = exc.reason, str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug on one file must not end a corpus-wide job
        result.reason, result.message = "internal_error", f"{type(exc).__name__}: {exc}"[:300]
    result.metrics["seconds"] = round(time.perf_counter() - start, 4)
    return result


def _attempts(cfg: IngestConfig) -> list[tuple[int, IngestConfig]]:
    """(unit length, config) in the order tried: every unit length, then (optionally) each again with -nt."""
    units = cfg.convert.unit_lengths or [8]
    attempts = [(unit, cfg) for unit in units]
    if cfg.convert.retry_without_triplets and "-nt" not in cfg.convert.extra_args:
        no_triplets = replace(cfg, convert=replace(cfg.convert, extra_args=[*cfg.convert.extra_args, "-nt"]))
        attempts += [(unit, no_triplets) for unit in units]
    return attempts


def _convert_and_gate(midi: bytes, score, unit: int, cfg: IngestConfig, metrics: dict) -> str:
    """midi2abc at unit length 1/``unit``, the validator, then the round trip; the ABC or a :class:`MidiReject`."""
    abc = run_midi2abc(midi, score, cfg.convert, unit).abc
    if len(abc) > 200_000:
        raise MidiReject("too_long", f"{len(abc)} characters of ABC")
    issues = validate_tune(abc)
    if errors := [f"{i.code}: {i.message}" for i in issues if i.severity == ERROR]:
        raise MidiReject("invalid_abc", "; ".join(errors)[:300])
    agree, bars = gate(abc, score.all_notes(), issues, cfg.convert.sandbox, cfg.gate)
    metrics.update(
        unit_length=unit,
        onset_f1=round(agree.onset_f1, 4),
        pitch_ratio=round(agree.pitch_ratio, 4),
        pitch_exact=agree.pitch_exact,
        bar_agreement=round(bars, 4),
    )
    if agree.onset_f1 < cfg.gate.min_onset_f1 or agree.pitch_ratio < cfg.gate.min_pitch_agreement:
        raise MidiReject(
            "low_agreement",
            f"round trip onset F1 {agree.onset_f1:.3f}, pitch agreement {agree.pitch_ratio:.3f} "
            f"(thresholds {cfg.gate.min_onset_f1}, {cfg.gate.min_pitch_agreement})",
        )
    if bars < cfg.gate.min_bar_agreement:
        raise MidiReject(
            "bad_bars", f"{bars:.0%} of bars match the meter (threshold {cfg.gate.min_bar_agreement:.0%})"
        )
    return abc


def _render_check(abc: str, cfg: IngestConfig) -> None:
    from chatmusician.render import RenderConfig, RenderRequest, render

    out = render(RenderRequest(abc, ["svg"]), RenderConfig(sandbox=cfg.convert.sandbox))
    if not out.ok:
        raise MidiReject("unrenderable", "; ".join(e["message"] for e in out.errors)[:300])


# --- sources --------------------------------------------------------------------------------------------------


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:  # from_uri cannot parse globs: resolve the folder above the first wildcard
        prefix = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]
        fs, base = pafs.FileSystem.from_uri(prefix)
        return fs, base.rstrip("/") + path[len(prefix) :]
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def _kind(path: str, src: MidiSourceConfig) -> str | None:
    if src.format != "auto":
        return src.format
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    return "midi" if any(name.endswith(e.lower()) for e in src.extensions) else None


def list_source(src: MidiSourceConfig) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """(filesystem, [(path, midi|parquet)]): a file as given; a folder's or a glob's files with a known kind."""
    fs, path = filesystem(src.path)
    if any(c in path for c in "*?["):
        base = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.is_file:
            return fs, [(path, src.format if src.format != "auto" else _kind(path, src) or "midi")]
        files = []
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [
                i.path
                for i in infos
                if i.is_file and not any(p.startswith((".", "_")) for p in i.path[len(path) :].split("/"))
            ]
    return fs, [(f, kind) for f in sorted(files) if (kind := _kind(f, src))]


def plan(cfg: IngestConfig) -> list[dict[str, Any]]:
    """Work items: up to ``files_per_task`` MIDI files each, or one parquet row group."""
    if not cfg.sources:
        raise SourceError("no sources given: set sources: [{path: ...}]")
    items: list[dict[str, Any]] = []
    for i, src in enumerate(cfg.sources):
        fs, files = list_source(src)
        if not files:
            raise SourceError(f"source {i} ({src.path!r}): no MIDI or parquet files found")
        midis = [f for f, kind in files if kind == "midi"]
        for k in range(0, len(midis), max(cfg.files_per_task, 1)):
            items.append({"source": i, "paths": midis[k : k + cfg.files_per_task], "row_group": -1})
        for f, kind in files:
            if kind == "parquet":
                pf = pq.ParquetFile(fs.open_input_file(f))
                if src.column not in pf.schema_arrow.names:
                    raise SourceError(f"source {i}: {f} has no column {src.column!r}")
                first = 0
                for g in range(pf.metadata.num_row_groups):
                    items.append({"source": i, "paths": [f], "row_group": g, "first_row": first})
                    first += pf.metadata.row_group(g).num_rows
    return items


def read_item(item: dict[str, Any], cfg: IngestConfig):
    """(row id, MIDI bytes, None for a null parquet value, or the size of a file too large to read)."""
    src = cfg.sources[item["source"]]
    fs, _ = filesystem(src.path)
    if item["row_group"] < 0:
        for path in item["paths"]:
            size = fs.get_file_info(path).size or 0
            if size > cfg.clean.max_file_bytes:
                yield path, size  # never read: only its size is known
                continue
            with fs.open_input_stream(path) as f:
                yield path, f.read()
        return
    pf = pq.ParquetFile(fs.open_input_file(item["paths"][0]))
    columns = [src.column] + ([src.id_column] if src.id_column else [])
    table = pf.read_row_group(item["row_group"], columns=columns)
    ids = table.column(src.id_column).to_pylist() if src.id_column else None
    for k, value in enumerate(table.column(src.column).to_pylist()):
        row_id = str(ids[k]) if ids else f"{item['paths'][0]}:{item['first_row'] + k}"
        yield row_id, value.encode() if isinstance(value, str) else value


def convert_items(items: pa.Table, cfg: IngestConfig) -> pa.Table:
    """Ray task: every MIDI of the work items -> one result row each (RESULT_SCHEMA)."""
    rows = {name: [] for name in RESULT_SCHEMA.names}
    for item in items.to_pylist():
        for row_id, data in read_item(item, cfg):
            if isinstance(data, int):
                res = IngestResult(
                    row_id, "too_large", f"{data} bytes, over the {cfg.clean.max_file_bytes}-byte limit"
                )
            else:
                res = ingest_one(data, row_id, cfg)
            rows["id"].append(res.id)
            rows["reason"].append(res.reason)
            rows["message"].append(res.message)
            rows["abc"].append(res.abc)
            rows["metrics"].append(json.dumps(res.metrics))
            rows["sft"].append(json.dumps(res.sft))
    return pa.table(rows, schema=RESULT_SCHEMA)


# --- output ---------------------------------------------------------------------------------------------------


class RowWriter:
    """Rows in order into ``<dir>/part-NNNNN.parquet`` files of ``shard_rows`` rows; stale parts removed."""

    def __init__(self, fs: pafs.FileSystem, root: str, schema: pa.Schema, shard_rows: int):
        self.fs, self.root, self.schema, self.shard_rows = fs, root, schema, shard_rows
        self.rows: list[dict[str, str]] = []
        self.files: list[str] = []
        fs.create_dir(root, recursive=True)

    def add(self, row: dict[str, str]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        name = f"part-{len(self.files):05d}.parquet"
        pq.write_table(
            pa.Table.from_pylist(self.rows, schema=self.schema), f"{self.root}/{name}", filesystem=self.fs
        )
        self.files.append(name)
        self.rows = []

    def close(self) -> list[str]:
        self._flush()
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        for info in infos:
            if re.fullmatch(r"part-\d{5}\.parquet", info.base_name) and info.base_name not in self.files:
                self.fs.delete_file(info.path)
        return self.files


def build_dataset(cfg: IngestConfig):
    """The lazy Ray Data stream of per-file results (RESULT_SCHEMA), in input order."""
    import ray

    if why := sandbox_available(cfg.convert.sandbox):
        raise RuntimeError(why)
    items = plan(cfg)
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    ds = ds.map_batches(
        convert_items, batch_size=1, batch_format="pyarrow", num_cpus=cfg.task_cpus, fn_kwargs={"cfg": cfg}
    )
    ds.context.execution_options.preserve_order = True  # deterministic rows and files
    ds.context.enable_progress_bars = cfg.progress
    return ds


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def write_rows(cfg: IngestConfig) -> dict[str, Any]:
    """Run the job; write ``pt/``, ``sft/`` and ``manifest.json`` into ``cfg.output_dir``; return the manifest."""
    fs, root = filesystem(cfg.output_dir)
    fs.create_dir(root, recursive=True)
    if fs.get_file_info(f"{root}/{MANIFEST}").is_file:  # no manifest while a run is in progress
        fs.delete_file(f"{root}/{MANIFEST}")
    pt = RowWriter(fs, f"{root}/pt", PT_SCHEMA, cfg.shard_rows)
    sft = RowWriter(fs, f"{root}/sft", SFT_SCHEMA, cfg.shard_rows)
    rejected: Counter[str] = Counter()
    samples, tasks = [], Counter()
    figures: dict[str, list[float]] = {"onset_f1": [], "pitch_ratio": [], "bar_agreement": []}
    read = accepted = snapped = 0
    started = time.perf_counter()
    for batch in build_dataset(cfg).iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            read += 1
            metrics = json.loads(row["metrics"])
            if row["reason"]:
                rejected[row["reason"]] += 1
                if len(samples) < cfg.reject_samples:
                    samples.append({"id": row["id"], "reason": row["reason"], "message": row["message"]})
                continue
            accepted += 1
            snapped += bool(metrics.get("snapped"))
            for key, values in figures.items():
                values.append(metrics[key])
            pt.add({"text": row["abc"], "src": cfg.src, "id": row["id"]})
            for task, fields in json.loads(row["sft"]):
                tasks[task] += 1
                sft.add({**fields, "src": cfg.src, "id": f"{row['id']}#{task}", "task": task})
    manifest = {
        "format": MANIFEST_FORMAT,
        "rows": {
            "read": read,
            "accepted": accepted,
            "rejected": sum(rejected.values()),
            "rejected_by_reason": dict(sorted(rejected.items())),
            "reject_samples": samples,
            "snapped": snapped,
            "sft_by_task": dict(sorted(tasks.items())),
        },
        "gate_means": {key: _mean(values) for key, values in figures.items()},
        "pt": {"dir": "pt", "files": pt.close(), "columns": PT_SCHEMA.names},
        "sft": {"dir": "sft", "files": sft.close(), "columns": SFT_SCHEMA.names},
        "seconds": round(time.perf_counter() - started, 2),
        "config": to_dict(cfg),
    }
    tmp = f"{root}/.{MANIFEST}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    fs.move(tmp, f"{root}/{MANIFEST}")
    return manifest


def run(cfg: IngestConfig) -> dict[str, Any]:
    """CLI / ``ray job submit`` entry: connect to the cluster (``RAY_ADDRESS``) or start a local Ray, run the
    job, print a summary, and shut down only what it started."""
    from chatmusician.ray_local import ray_session

    with ray_session():
        manifest = write_rows(cfg)
    summary = {k: v for k, v in manifest["rows"].items() if k != "reject_samples"}
    summary["gate_means"] = manifest["gate_means"]
    summary["output_dir"] = cfg.output_dir
    print(json.dumps(summary, indent=2))
    return manifest


def result_dict(result: IngestResult) -> dict[str, Any]:
    return asdict(result)
