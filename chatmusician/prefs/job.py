"""``chatmusician prefs`` (``ray_jobs.prefs``): sample N answers per prompt through the evaluation's replica pool
(Ray Data actors, each sample from its own seeded generator: the answers do not depend on batching), score each
with the music rewards, pair top vs bottom per prompt, write ``pairs.parquet`` (``prompt``/``chosen``/
``rejected`` + every score), ``samples.parquet`` (every sample and score) and ``manifest.json`` (reward
statistics, the prompts that gave no valid pair, the config)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from chatmusician.eval import abc_quality
from chatmusician.eval.config import AbcQualityConfig, EvalConfig, MMLUConfig, MTBConfig
from chatmusician.prefs import pairs as pairing
from chatmusician.prefs import rewards
from chatmusician.prefs.config import PrefsConfig
from chatmusician.prompts import build_chat_prompt
from chatmusician.serve.votes import read_votes

MANIFEST_FORMAT = "chatmusician.prefs/1"


def check_config(cfg: PrefsConfig) -> None:
    """Config mistakes before any work starts (one ValueError line)."""
    if cfg.n_per_prompt < 2:
        raise ValueError(
            f"n_per_prompt must be at least 2 (a pair needs two answers), got {cfg.n_per_prompt}"
        )
    if not 0.0 < cfg.pair_fraction <= 0.5:
        raise ValueError(f"pair_fraction must be in (0, 0.5], got {cfg.pair_fraction}")
    if cfg.chosen_constrained and cfg.chosen_header:
        raise ValueError(
            "chosen_constrained and chosen_header each say where chosen answers come from: set one"
        )
    if cfg.max_new_tokens < 1 or cfg.temperature < 0:
        raise ValueError("max_new_tokens must be >= 1 and temperature >= 0")
    from chatmusician.prefs.vllm_pool import check

    check(cfg)
    rewards.check_weights(cfg.weights)
    rewards.load_user_reward(cfg.user_reward)
    if cfg.votes and not Path(cfg.votes).is_file():
        raise FileNotFoundError(f"votes: no file {cfg.votes} (the Serve app's votes_path)")


def eval_config(cfg: PrefsConfig) -> EvalConfig:
    """The evaluation config whose replica pool samples the answers (ABC quality items only)."""
    return EvalConfig(
        model=cfg.model, tokenizer=cfg.tokenizer, adapter=cfg.adapter, precision=cfg.precision,
        device=cfg.device, paper_figures=None, mtb=MTBConfig(enabled=False, seed=cfg.seed),
        mmlu=MMLUConfig(enabled=False), pool=cfg.pool,
        abc_quality=AbcQualityConfig(
            enabled=True, prompts=cfg.prompts, n_per_prompt=cfg.n_per_prompt, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            repetition_penalty=cfg.repetition_penalty, constrained=cfg.constrained, check_midi=cfg.check_midi,
            train_tunes=cfg.train_tunes,
        ),
    )  # fmt: skip


def sample(cfg: PrefsConfig, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every answer: ``{name, sample, text, tokens}`` (Ray must be up when ``pool.use_ray``); with
    ``chosen_constrained`` / ``chosen_header`` also as many constrained / asked-header-first ones (``role`` chosen,
    samples numbered after the free ones, which get ``role`` rejected)."""
    free = _sample(cfg, prompts)
    if cfg.chosen_constrained:
        chosen = _sample(replace(cfg, constrained=True, seed=cfg.seed + 1), prompts)
    elif cfg.chosen_header:
        chosen = _sample(
            replace(cfg, seed=cfg.seed + 1), [p | {"answer_prefix": asked_header(p)} for p in prompts]
        )
    else:
        return free
    n = cfg.n_per_prompt
    return [a | {"role": "rejected"} for a in free] + [
        a | {"sample": a["sample"] + n, "role": "chosen"} for a in chosen
    ]


def asked_header(prompt: dict[str, Any]) -> str:
    """The header a tune answering ``prompt`` starts with: the asked meter, unit length and key (X:1 first). The
    unit length is always written (the description's, else 1/8): ABC's default for a meter under 3/4 is 1/16,
    which a model trained on the corpus rarely means."""
    request, described = prompt.get("request", {}), prompt.get("fields", {}).get("description", {})
    unit = request.get("unit_length") or described.get("Note Length") or "1/8"
    fields = [("M", request.get("meter")), ("L", unit), ("K", request.get("key"))]
    return "X:1\n" + "".join(f"{name}:{value}\n" for name, value in fields if value)


def _sample(cfg: PrefsConfig, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from chatmusician.eval.runner import abc_items, execute

    items = abc_items(prompts, cfg.n_per_prompt, cfg.seed)
    if cfg.engine == "vllm":
        from chatmusician.prefs import vllm_pool

        results = vllm_pool.run(cfg, items)
    else:
        results = execute(eval_config(cfg), items)
    out = []
    for r in results:
        _, name, k = json.loads(r["key"])
        res = json.loads(r["result"])
        out.append({"name": name, "sample": k, "text": res["text"], "tokens": res["tokens"]})
    return sorted(out, key=lambda r: (r["name"], r["sample"]))


def score_samples(
    cfg: PrefsConfig, prompts: list[dict[str, Any]], answers: list[dict[str, Any]], midi_check=None
) -> list[dict[str, Any]]:
    """Each answer with its metrics and rewards (``midi_check(text) -> bool``: the renderer's judge by default)."""
    by_name = {p["name"]: p for p in prompts}
    user_fn = rewards.load_user_reward(cfg.user_reward)
    check = midi_check or abc_quality.midi_check
    train = abc_quality.load_train_tunes(cfg.train_tunes) if cfg.train_tunes else None
    rows = []
    for a in answers:
        p = by_name[a["name"]]
        parsed = abc_quality.tune_metrics(a["text"], p["request"])
        midi_ok = check(a["text"]) if cfg.check_midi and parsed.get("syntax_ok") else None
        if cfg.check_midi and not parsed.get("syntax_ok"):
            midi_ok = False  # a tune that does not parse is never sent to abc2midi
        rows.append({**a, "family": p["family"], "prompt": build_chat_prompt(p["prompt"]),
                     "instruction": p["prompt"], **parsed, "midi_ok": midi_ok,
                     "parse_success": bool(parsed.get("syntax_ok")) and midi_ok is not False})  # fmt: skip
    if train is not None:
        abc_quality.memorisation(rows, train)
    for r in rows:
        user = (
            rewards.user_score(user_fn, r["text"], by_name[r["name"]]["request"], cfg.user_reward)
            if user_fn
            else None
        )
        r |= rewards.score(r, by_name[r["name"]]["request"], cfg.weights, user, cfg.chosen_strict)
        r.pop("body", None), r.pop("music_tokens", None)
    return rows


def manifest(cfg: PrefsConfig, rows: list[dict[str, Any]], pairs: list[dict], empty: list[str]) -> dict:
    reward_keys = sorted({k for r in rows for k in r if k == "reward" or k.startswith("reward_")})
    return {
        "format": MANIFEST_FORMAT,
        "model": cfg.model,
        "adapter": cfg.adapter,
        "prompts": len({r["name"] for r in rows}),
        "samples": len(rows),
        "valid_samples": sum(bool(r["valid"]) for r in rows),
        "pairs": len(pairs),
        "prompts_without_pair": empty,
        "rewards": {k: pairing.stats([r.get(k) for r in rows]) for k in reward_keys},
        "config": asdict(cfg),
    }


def write(out_dir: str | Path, rows: list[dict], pairs: list[dict], meta: dict) -> Path:
    """pairs.parquet, samples.parquet and manifest.json (written last: no manifest = unfinished)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    cols = ["name", "sample", "family", "instruction", "prompt", "text", "tokens", "valid", "reward"]
    keys = cols + sorted({k for r in rows for k in r if k not in cols and _scalar(r.get(k))})
    pq.write_table(
        pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), root / "samples.parquet"
    )
    columns = list(dict.fromkeys(k for p in pairs for k in p))  # votes carry no scores: those cells are null
    schema_rows = [{k: p.get(k) for k in columns} for p in pairs] or [
        {"name": "", "prompt": "", "chosen": "", "rejected": "", "source": ""}
    ]
    table = pa.Table.from_pylist(schema_rows)
    pq.write_table(table if pairs else table.slice(0, 0), root / "pairs.parquet")
    (root / "manifest.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return root


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def build(cfg: PrefsConfig, midi_check=None) -> dict[str, Any]:
    """Sample, score, pair and write (Ray must be up when ``pool.use_ray``); returns the manifest."""
    check_config(cfg)
    started = time.perf_counter()
    prompts = abc_quality.load_prompts(cfg.prompts)
    print(f"[prefs] {len(prompts)} prompts x {cfg.n_per_prompt} samples", file=sys.stderr, flush=True)
    rows = score_samples(cfg, prompts, sample(cfg, prompts), midi_check)
    pairs, empty = pairing.make_pairs(rows, cfg.pair_fraction)
    pairs = [p | {"source": "rewards"} for p in pairs]
    votes, skipped = read_votes(cfg.votes) if cfg.votes else ([], 0)
    pairs += [
        {"name": "web-ui", **{k: v[k] for k in ("prompt", "chosen", "rejected")}, "source": "web-ui"}
        for v in votes
    ]
    meta = manifest(cfg, rows, pairs, empty) | {
        "wall_s": time.perf_counter() - started,
        "votes": {"pairs": len(votes), "skipped_lines": skipped},
    }
    write(cfg.output_dir, rows, pairs, meta)
    return meta


def run(cfg: PrefsConfig) -> dict[str, Any]:
    """CLI / ``ray job submit`` entry: join the cluster (``RAY_ADDRESS``) or start a local Ray, build, print a
    one-line JSON summary."""
    from contextlib import nullcontext

    from chatmusician.ray_local import ray_session

    check_config(cfg)  # before Ray starts
    with ray_session() if cfg.pool.use_ray else nullcontext():
        meta = build(cfg)
    summary = {k: meta[k] for k in ("samples", "valid_samples", "pairs", "prompts_without_pair")}
    print(
        json.dumps(
            {"output_dir": cfg.output_dir, **summary, "reward_mean": meta["rewards"]["reward"].get("mean")}
        )
    )
    return meta
