"""Quality of generated ABC (the paper's Tables 5-6 and its successors' metrics), per tune and summarized.

A prompt set covers the original's task families (text -> music, chords, form, motif + form, harmonisation,
style); each prompt may say what it asks for (``request``: key, meter, sections). For each generated answer:

* ``parse_success``: a tune was found, the validator reports no error, and abc2midi (sandboxed) wrote a MIDI
  file with music in it;
* ``key_present`` / ``meter_present`` and, where requested, ``key_as_requested`` / ``meter_as_requested``;
* ``bar_consistency``: the share of inner bars (first and last left out: pickups) lasting what the meter says;
* ``has_repeats``: repeat signs or numbered endings; ``tokens``: generated tokens;
* structure: ``bars``, ``distinct_bar_ratio`` (distinct bars / bars) and ``repeated_bigram_share`` (bar pairs
  that occur more than once: the motif reuse that folk tunes have and rambling text has not);
* the metrics the field reports (:mod:`chatmusician.eval.music_metrics`, each defined there with its source):
  ``bar_alignment_error`` (NotaGen's BAE), ``unit_as_requested``, MusPy's ``pitch_range``,
  ``pitch_class_entropy``, ``scale_consistency``, ``groove_consistency`` and ``empty_beat_rate``; per prompt
  ``distinct_n`` and ``self_similarity`` over its samples; ``nearest_train_similarity`` and ``memorised``
  (above NotaGen's 0.95) against the training tunes when given.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from chatmusician.abc import extract_tunes, has_errors, parse_key, parse_tune, validate_tune
from chatmusician.abc.fields import default_unit_length, parse_unit_length
from chatmusician.abc.validate import split_voices, tokenize
from chatmusician.eval import music_metrics
from chatmusician.eval.config import FIXTURES
from chatmusician.prompts import Task, build_task_prompt

DEFAULT_PROMPTS = FIXTURES / "abc_prompts.json"
_BAR_SPLIT = re.compile(r"\|\]|\[\||\|\||:\|\]?|\|:|::|\|[12]?|\[[12]")
_REPEAT = re.compile(r"\|:|:\||::|\[[12]|\|[12]")
_COMMENT = re.compile(r"%.*")


def load_prompts(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The prompt set: ``[{name, family, fields, request}]`` (JSON list or JSONL); each becomes a user prompt
    (``prompt`` added)."""
    path = Path(path) if path else DEFAULT_PROMPTS
    text = path.read_text(encoding="utf-8")
    rows = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    )
    out = []
    for i, row in enumerate(rows):
        prompt = build_task_prompt(Task(row["family"], row.get("fields", {})))  # ValueError names a bad field
        out.append({"name": row.get("name", f"prompt-{i}"), "family": row["family"], "prompt": prompt,
                    "fields": row.get("fields", {}), "request": row.get("request", {})})  # fmt: skip
    return out


def _same_key(a: str, b: str) -> bool:
    try:
        ka, kb = parse_key(a), parse_key(b)
    except ValueError:
        return False
    return (ka.tonic, ka.mode) == (kb.tonic, kb.mode)


def _meter_text(value: str) -> str:
    text = re.sub(r"\s+", "", value)
    return {"C": "4/4", "C|": "2/2"}.get(text, text)


def _same_meter(a: str, b: str) -> bool:
    """Same time signature as written (6/8 is not 3/4, though both bars last three quarters); C = 4/4."""
    return _meter_text(a) == _meter_text(b)


def body_bars(body: str) -> list[str]:
    """The bars of a tune body as normalized strings (spaces, comments and bar-line kinds dropped)."""
    lines = [_COMMENT.sub("", ln) for ln in body.splitlines() if not re.match(r"^[A-Za-z]:", ln)]
    bars = [re.sub(r"\s+", "", b) for b in _BAR_SPLIT.split("\n".join(lines))]
    return [b for b in bars if b]


def structure(bars: list[str]) -> dict[str, float]:
    """Repetition statistics of a bar sequence."""
    n = len(bars)
    pairs = Counter(zip(bars, bars[1:], strict=False))
    repeated = sum(c for c in pairs.values() if c > 1)
    return {
        "bars": n,
        "distinct_bar_ratio": len(set(bars)) / n if n else 0.0,
        "repeated_bigram_share": repeated / max(1, n - 1) if n > 1 else 0.0,
    }


def _same_unit(tune, wanted: str) -> bool:
    """The tune's L: (or the standard's default for its meter) is the unit asked for."""
    try:
        have = tune.header("L")
        unit = parse_unit_length(have) if have else default_unit_length(tune.meter)
        return unit == parse_unit_length(str(wanted))
    except ValueError:
        return False


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def bar_consistency(tune) -> float | None:
    """Share of inner bars (all voices; first and last left out) lasting what the meter in force says; None
    with no meter or fewer than three bars. Inline meter changes are followed."""
    try:
        voices = split_voices(tune, tokenize(tune), [])
    except Exception:  # noqa: BLE001 - the tokenizer is third-party; a bad tune is just inconsistent
        return 0.0
    inner = [
        bar
        for bars in voices.values()
        for bar in [b for b in bars if b.first is not None][1:-1]
        if bar.meter is not None and not bar.whole_bar_rest
    ]
    if not inner:
        return None
    return sum(bar.duration == bar.meter for bar in inner) / len(inner)


def tune_metrics(
    text: str, request: Mapping[str, Any] | None = None, midi_ok: bool | None = None
) -> dict[str, Any]:
    """Metrics of one generated answer (``midi_ok``: abc2midi's verdict, None when not checked)."""
    request = request or {}
    found = extract_tunes(text)
    if not found.found:
        out = {"found": False, "syntax_ok": False, "midi_ok": False, "parse_success": False,
               "key_present": False, "meter_present": False, "has_repeats": False}  # fmt: skip
        asked = [k for k in ("key", "meter", "unit") if k in request or f"{k}_length" in request]
        return out | {f"{k}_as_requested": False for k in asked}
    tune_text = found.tunes[0]
    tune = parse_tune(tune_text)
    syntax_ok = not has_errors(validate_tune(tune_text))
    key, meter = tune.header("K"), tune.header("M")
    out: dict[str, Any] = {
        "found": True,
        "syntax_ok": syntax_ok,
        "midi_ok": midi_ok,
        "parse_success": syntax_ok and midi_ok is not False,
        "key_present": bool(key and key.strip()),
        "meter_present": bool(meter and meter.strip()),
        "has_repeats": bool(_REPEAT.search(tune.body)),
        "bar_consistency": bar_consistency(tune),
        "bar_alignment_error": music_metrics.bar_alignment_error(tune),
        **structure(body_bars(tune.body)),
        **{k: _finite(v) for k, v in music_metrics.muspy_metrics(tune).items()},
        "body": music_metrics.normalised_body(tune.body),
        "music_tokens": music_metrics.music_tokens(tune),
    }
    if "key" in request:
        out["key_as_requested"] = bool(key) and _same_key(key, request["key"])
    if "meter" in request:
        out["meter_as_requested"] = bool(meter) and _same_meter(meter, request["meter"])
    if "unit_length" in request:
        out["unit_as_requested"] = _same_unit(tune, request["unit_length"])
    return out


def diversity(rows: list[dict[str, Any]], n: int) -> None:
    """Per prompt, over its samples (each row of the prompt gets the prompt's value): ``distinct_n`` of the music
    tokens and ``self_similarity`` of the bodies. Tunes not found take no part."""
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_prompt[r["name"]].append(r)
    for group in by_prompt.values():
        found = [r for r in group if r.get("found")]
        d = music_metrics.distinct_n([r["music_tokens"] for r in found], n)
        sim = music_metrics.self_similarity([r["body"] for r in found])
        for r in group:
            r["distinct_n"], r["self_similarity"] = d, sim


def memorisation(rows: list[dict[str, Any]], train_bodies: list[str]) -> None:
    """Each found tune's similarity to its nearest training tune and whether it passes NotaGen's 0.95 bar."""
    for r in rows:
        if r.get("found"):
            score, index = music_metrics.nearest(r["body"], train_bodies)
            r["nearest_train_similarity"], r["nearest_train_index"] = score, index
            r["memorised"] = score > music_metrics.MEMORISED


def load_train_tunes(path: str | Path) -> list[str]:
    """Normalised bodies of the training tunes: ABC text files (a file or a folder of .abc/.txt) or JSONL with a
    ``text`` (or ``abc``) field, every tune the extractor finds."""
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix in {".abc", ".txt", ".jsonl"})
    )
    texts: list[str] = []
    for f in files:
        raw = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix == ".jsonl":
            rows = [json.loads(ln) for ln in raw.splitlines() if ln.strip()]
            texts += [str(r.get("text") or r.get("abc") or "") for r in rows]
        else:
            texts.append(raw)
    bodies = []
    for text in texts:
        for tune in extract_tunes(text).tunes:
            bodies.append(music_metrics.normalised_body(parse_tune(tune).body))
    return [b for b in bodies if b]


def midi_check(text: str, render_config=None) -> bool:
    """abc2midi (sandboxed, through the render pipeline) writes a MIDI file with music in it."""
    from chatmusician.render.pipeline import RenderRequest, render

    found = extract_tunes(text)
    if not found.found:
        return False
    result = render(RenderRequest(abc=found.tunes[0], formats=["midi"]), render_config)
    return bool(result.ok and result.outputs.get("midi") and (result.duration_s or 0) > 0)


_RATES = ("found", "syntax_ok", "midi_ok", "parse_success", "key_present", "meter_present", "has_repeats",
          "key_as_requested", "meter_as_requested", "unit_as_requested", "memorised")  # fmt: skip
_MEANS = ("bar_consistency", "bar_alignment_error", "bars", "distinct_bar_ratio", "repeated_bigram_share", "tokens",
          "pitch_range", "pitch_class_entropy", "scale_consistency", "groove_consistency", "empty_beat_rate",
          "distinct_n", "self_similarity", "nearest_train_similarity")  # fmt: skip
METRICS = _RATES + _MEANS
"""Every summarized metric, in report order."""


def _aggregate(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tunes": len(rows)}
    for name in _RATES + _MEANS:
        values = [float(r[name]) for r in rows if r.get(name) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Rates (share of tunes) and means over all tunes and per task family."""
    rows = list(rows)
    families: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        families[r["family"]].append(r)
    return {"all": _aggregate(rows), "families": {f: _aggregate(v) for f, v in sorted(families.items())}}
