"""Stage 9, first half: compose through the running app's ``/v1/compose``, free and grammar-constrained, every
request at once (the Composer batches them); each answer judged as the evaluation does: the parse rate, and
strict validity (parses, plays, and no bar-duration error: every bar as long as its meter)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chatmusician.client import ApiError, AppClient
from chatmusician.quickstart.config import QuickstartConfig
from chatmusician.quickstart.console import Console
from chatmusician.quickstart.data import header_description

ARMS = ("free", "constrained")


def compose_prompts(tunes: list[str], n: int) -> list[str]:
    """The original's example text-to-music prompt, then descriptions (key, meter, rhythm) of tunes spread over
    the corpus, without titles: the requests a newcomer would type."""
    from chatmusician.prompts import EXAMPLE_PROMPTS, text_to_music

    prompts = [EXAMPLE_PROMPTS[0]]
    step = max(1, len(tunes) // max(1, n))
    for tune in tunes[step // 2 :: step]:
        if len(prompts) >= n:
            break
        d = header_description(tune)
        prompts.append(text_to_music({k: v for k, v in d.items() if k != "Title"}))
    return prompts[:n]


def judge_composition(text: str, midi_ok: bool) -> dict[str, Any]:
    """Parse verdict of one answer: a tune found, no validator error, abc2midi wrote a usable MIDI (eval's metric);
    strict: that, and no bar-duration issue from the validator (every bar as long as its meter)."""
    from chatmusician.eval.abc_quality import tune_metrics

    m = tune_metrics(text, midi_ok=midi_ok)
    return {
        "found": m["found"],
        "syntax_ok": m["syntax_ok"],
        "midi_ok": m["midi_ok"],
        "parses": m["parse_success"],
        "strict": bool(m["parse_success"]) and not m.get("bar_alignment_error"),
    }


def parse_rate(rows: list[dict[str, Any]]) -> float:
    return sum(bool(r["parses"]) for r in rows) / len(rows) if rows else 0.0


def strict_rate(rows: list[dict[str, Any]]) -> float:
    """Share that parses, plays and has no bar-duration issue."""
    return sum(bool(r.get("strict")) for r in rows) / len(rows) if rows else 0.0


def first_parsing(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The composition to render: a free one that parses first (the model's own music), else a constrained one."""
    for arm in ARMS:
        for r in rows:
            if r["arm"] == arm and r["parses"] and r.get("abc"):
                return r
    return None


def why_not(row: dict[str, Any]) -> str:
    """Why a composition does not parse, in a few words."""
    if row.get("status") != 200:
        return f"HTTP {row.get('status')}: {(row.get('error') or {}).get('message', '')}"
    if not row.get("found"):
        return "no tune in the answer"
    if not row.get("syntax_ok"):
        return "validator errors"
    return "abc2midi wrote no usable MIDI"


def compose_one(app: AppClient, cfg: QuickstartConfig, arm: str, i: int, prompt: str) -> dict[str, Any]:
    """One composition and its verdict (a refusal of the app is a row that does not parse, with its error)."""
    from chatmusician.eval.abc_quality import midi_check

    params = {"max_new_tokens": cfg.compose_max_new_tokens, "temperature": cfg.compose_temperature, "seed": i}
    row: dict[str, Any] = {"arm": arm, "prompt_index": i, "prompt": prompt}
    try:
        tune = app.compose(prompt, params=params, formats=[], constrained=arm == "constrained")
    except ApiError as err:
        return {**row, "status": err.status, "text": "", "abc": None, "tokens": None,
                "error": err.body.get("error") or {"message": err.message}, "parses": False}  # fmt: skip
    return {**row, "status": 200, "text": tune.text, "abc": tune.abc, "tokens": tune.completion_tokens,
            "error": None, **judge_composition(tune.text, midi_check(tune.text))}  # fmt: skip


def compose(cfg: QuickstartConfig, console: Console, app: AppClient, tunes: list[str]) -> dict:
    """Every prompt in both arms at once; the rows and the parse rate per arm."""
    prompts = compose_prompts(tunes, cfg.compose_prompts)
    jobs = [(arm, i, p) for arm in ARMS for i, p in enumerate(prompts)]
    done, lock = 0, threading.Lock()

    def one(job: tuple[str, int, str]) -> dict[str, Any]:
        nonlocal done
        row = compose_one(app, cfg, *job)
        verdict = "parses" if row["parses"] else f"does not parse ({why_not(row)})"
        with lock:
            done += 1
            board.update(
                "compose", done, len(jobs), f"{row['arm']:<11} prompt {row['prompt_index'] + 1}: {verdict}"
            )
        return row

    with console.board() as board, ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        rows = list(pool.map(one, jobs))
    rates = {arm: parse_rate([r for r in rows if r["arm"] == arm]) for arm in ARMS}
    strict = {arm: strict_rate([r for r in rows if r["arm"] == arm]) for arm in ARMS}
    console.detail(
        f"parse rate: free {100 * rates['free']:.0f} %, constrained {100 * rates['constrained']:.0f} %; "
        f"strictly valid (no bar-duration error too): free {100 * strict['free']:.0f} %, "
        f"constrained {100 * strict['constrained']:.0f} %"
    )
    return {"prompts": prompts, "rows": rows, "parse_rate": rates, "strict_rate": strict}
