"""The meter tracker's per-point verdict cache (``MeterTracker.verdicts``) and the decoder's mask over it answer
exactly what an uncached scan answers, over random token walks through headers and bodies."""

from __future__ import annotations

import random

import pytest

from chatmusician.abc.meter import MeterTracker, Violation, can_end
from chatmusician.model.meter import bar_fill, copy_tracker, keep_row, meter_mask_row, tracker_for

HEADS = ["", "X:1\nM:3/4\nL:1/8\nK:G\n", "X:1\nM:6/8\nK:D\n", "X:1\nM:C\nL:1/16\nK:C\n", "X:1\nM:2/4\nK:F\n"]
POOL = (
    ["A", "B", "c", "d2", "e/", "f3", "G,", "^F", "=c", "_B", "z", "z2", "x", "Z", "2", "/", "/2", "3/2", "4"]
    + ["|", "|:", ":|", "||", "|]", "[1", " ", "\n", ">", "<", "(3", "[", "]", "]2", "[CEG]", "{g}", "-", "~"]
    + ["[M:3/4]", "[L:1/16]", "M:", "L:1/8\n", "K:G\n", "X:1\n", "M:6/8\n", '"Am"', "!trill!", "(", ")", "%"]
)


def _uncached_allows(tracker: MeterTracker, text: str) -> bool:
    if tracker.broken:
        return True
    try:
        tracker._scan(tracker.tail + text, final=False)
    except Violation:
        return False
    return True


def _uncached_can_end(tracker: MeterTracker) -> bool:
    try:
        return not tracker.broken and can_end(tracker._scan(tracker.tail, final=True)[0])
    except Violation:
        return False


@pytest.mark.parametrize("seed", range(6))
def test_cached_verdicts_equal_uncached_scans_over_random_walks(seed):
    rng = random.Random(seed)
    for walk in range(8):
        text = HEADS[(seed + walk) % len(HEADS)]
        tracker = tracker_for(text)
        for _ in range(60):
            asked = rng.sample(POOL, 12)
            fresh = tracker_for(text)  # the same point reached in one push: another snap, an empty cache
            copy = copy_tracker(tracker)
            for text_ in asked + asked[::-1]:  # asked twice: the second answer comes from the cache
                want = _uncached_allows(fresh, text_)
                assert tracker.allows(text_) == want == copy.allows(text_), (text, text_)
            assert tracker.can_end() == _uncached_can_end(fresh) == tracker.can_end(), text
            assert bar_fill(tracker) == bar_fill(fresh)
            copy.push(asked[0])  # a copy moving on leaves the original's answers alone
            assert all(tracker.allows(t) == _uncached_allows(fresh, t) for t in asked)
            ok = [t for t in asked if tracker.allows(t)]
            step = rng.choice(ok) if ok and rng.random() < 0.97 else rng.choice(asked)
            tracker.push(step)
            text += step
            if tracker.broken:
                break


def test_meter_mask_is_the_same_from_a_cached_and_a_fresh_tracker():
    torch = pytest.importorskip("torch")
    rng = random.Random(7)
    texts = POOL + ["<eos>"]
    eos = len(POOL)
    generator = torch.Generator().manual_seed(7)
    for walk in range(6):
        text = HEADS[walk % len(HEADS)]
        tracker = tracker_for(text)
        for _ in range(40):
            scores = torch.randn(len(texts), generator=generator) * 3
            cached = meter_mask_row(tracker, scores.clone(), texts, eos)
            again = meter_mask_row(tracker, scores.clone(), texts, eos)  # every verdict from the cache now
            fresh = meter_mask_row(tracker_for(text), scores.clone(), texts, eos)
            assert cached == again == fresh, text
            order = sorted(range(len(texts)), key=lambda t: -float(scores[t]))
            assert keep_row(tracker, order, [], texts, eos, limit=99) == keep_row(
                tracker_for(text), order, [], texts, eos, limit=99
            )
            step = rng.choice([t for t in cached if t != eos] or list(range(len(POOL))))
            tracker.push(texts[step])
            text += texts[step]
            if tracker.broken:
                break
