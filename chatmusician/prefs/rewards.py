"""Music rewards of one generated answer, computed from the output itself (pure functions).

Each reward is in [0, 1] and comes from what the evaluation already measures
(:func:`chatmusician.eval.abc_quality.tune_metrics`): ``parses`` (a tune is found and the validator reports no
error), ``plays`` (abc2midi's verdict through the renderer's judge), ``bar_alignment`` (1 - NotaGen's
bar-alignment error), ``as_requested`` (the share of the asked key / meter / unit length / bar count honoured),
``structure`` (half for repeat signs or endings, half for the share of reused bar pairs) and ``novelty``
(1 - similarity to the nearest training tune); ``strict`` is 1 for a strictly valid tune (parses, plays, no bar
off its meter, the asked key and meter: the rounds' guard, :func:`strictly_valid`). The total is the weighted mean (:class:`RewardWeights`), with an
optional user reward. A tune is *valid* when it parses, plays and is no near-copy of a training tune: only valid
tunes are ever chosen.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from chatmusician.prefs.config import RewardWeights

REWARDS = ("parses", "plays", "bar_alignment", "as_requested", "structure", "novelty", "strict")
"""The built-in rewards, in report order (the user reward is ``user``)."""
BARS_TOLERANCE = 1
"""An asked bar count is honoured within this many bars (a pickup or a closing bar counted apart)."""


class RewardError(ValueError):
    """A reward setting that cannot work (bad weights, a user reward that cannot be imported or misbehaves)."""


def as_requested(metrics: Mapping[str, Any], request: Mapping[str, Any]) -> float:
    """Share of the request's key, meter, unit length and bar count that the tune honours (1 with no request)."""
    checks = [bool(metrics.get(f"{k}_as_requested")) for k in ("key", "meter") if k in request]
    if "unit_length" in request:
        checks.append(bool(metrics.get("unit_as_requested")))
    if "bars" in request:
        bars = metrics.get("bars")
        checks.append(bars is not None and abs(int(bars) - int(request["bars"])) <= BARS_TOLERANCE)
    return sum(checks) / len(checks) if checks else 1.0


def components(metrics: Mapping[str, Any], request: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The built-in rewards of one answer from its :func:`tune_metrics` row (``midi_ok`` None = not checked:
    counted as playing when it parses; ``nearest_train_similarity`` absent = no training tunes given)."""
    request = request or {}
    if not metrics.get("found"):
        return dict.fromkeys(REWARDS, 0.0)
    parses = bool(metrics.get("syntax_ok"))
    midi = metrics.get("midi_ok")
    bae = metrics.get("bar_alignment_error")
    return {
        "parses": float(parses),
        "plays": float(midi if midi is not None else parses),
        "bar_alignment": 1.0 - bae if bae is not None else 0.0,
        "as_requested": as_requested(metrics, request),
        "structure": 0.5 * bool(metrics.get("has_repeats"))
        + 0.5 * float(metrics.get("repeated_bigram_share") or 0),
        "novelty": 1.0 - float(metrics.get("nearest_train_similarity") or 0.0),
        "strict": float(strictly_valid(metrics, request)),
    }


def strictly_valid(metrics: Mapping[str, Any], request: Mapping[str, Any] | None = None) -> bool:
    """Parses, plays (or was not checked), no bar off its meter (bar-alignment error 0) and the key and meter are
    the asked ones (where ``request`` asks): the strict validity the rounds guard (:mod:`chatmusician.prefs.guards`)."""
    request = request or {}
    return (
        bool(metrics.get("syntax_ok"))
        and metrics.get("midi_ok") is not False
        and (metrics.get("bar_alignment_error") or 0.0) == 0.0
        and all(metrics.get(f"{k}_as_requested") is not False for k in ("key", "meter") if k in request)
    )


def check_weights(weights: RewardWeights) -> None:
    values = dataclasses.asdict(weights)
    bad = {k: v for k, v in values.items() if v < 0}
    if bad or not any(values[k] for k in REWARDS):
        raise RewardError(f"weights must be >= 0 with at least one built-in reward above 0, got {values}")


def total(parts: Mapping[str, float], weights: RewardWeights, user: float | None = None) -> float:
    """Weighted mean of the rewards (``user`` joins with ``weights.user`` when given)."""
    w = dataclasses.asdict(weights)
    num = sum(w[k] * parts[k] for k in REWARDS)
    den = sum(w[k] for k in REWARDS)
    if user is not None:
        num, den = num + w["user"] * user, den + w["user"]
    return num / den if den else 0.0


def is_valid(metrics: Mapping[str, Any]) -> bool:
    """Parses, plays (or was not checked) and is no near-copy of a training tune: may be chosen."""
    return (
        bool(metrics.get("syntax_ok"))
        and metrics.get("midi_ok") is not False
        and not metrics.get("memorised")
    )


def load_user_reward(dotted: str | None) -> Callable[[str, Mapping[str, Any]], float] | None:
    """``module:function`` -> the function (None for None); a bad path is one :class:`RewardError` line."""
    if not dotted:
        return None
    module, _, attr = dotted.partition(":")
    if not module or not attr:
        raise RewardError(f"user_reward must look like 'package.module:function', got {dotted!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"user_reward {dotted!r} cannot be imported: {err}") from None


def user_score(fn, text: str, request: Mapping[str, Any], dotted: str) -> float:
    """The user reward of one answer, checked to be a number in [0, 1]."""
    value = fn(text, dict(request))
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise RewardError(f"user_reward {dotted} must return a number in [0, 1], returned {value!r}")
    return float(value)


def score(
    metrics: Mapping[str, Any],
    request: Mapping[str, Any] | None,
    weights: RewardWeights,
    user: float | None = None,
    chosen_strict: bool = False,
) -> dict[str, Any]:
    """Every reward of one answer, its total and whether it is valid: ``{reward_<name>..., reward, valid}``
    (``chosen_strict``: valid also needs the strict reward, so only strictly valid tunes are chosen)."""
    parts = components(metrics, request)
    out: dict[str, Any] = {f"reward_{k}": v for k, v in parts.items()}
    if user is not None:
        out["reward_user"] = user
    valid = is_valid(metrics) and (not chosen_strict or parts["strict"] == 1.0)
    return out | {"reward": total(parts, weights, user), "valid": valid}
