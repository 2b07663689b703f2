"""RowSampler with a verifier (meter-aware constrained decoding checks only the token drawn): the draw comes from
the row's distribution restricted to what the verifier accepts; refused tokens never come out."""

from __future__ import annotations

import math

import torch

from chatmusician.model.sampling import RowSampler, RowSampling


class Refuses:
    """A verifier that refuses ``refused``; its rescue is the best accepted token by score."""

    def __init__(self, refused: set[int]):
        self.refused, self.asked, self.rescues = refused, 0, 0

    def accepts(self, row: int, token: int) -> bool:
        self.asked += 1
        return token not in self.refused

    def rescue(self, row: int, logits) -> int | None:
        self.rescues += 1
        order = torch.argsort(logits, descending=True).tolist()
        return next((t for t in order if t not in self.refused and math.isfinite(logits[t])), None)


def _draws(logits: list[float], sampling: RowSampling, verifier, n: int) -> list[int]:
    sampler = RowSampler([sampling], "cpu", verifier)
    ids, scores = torch.zeros((1, 1), dtype=torch.long), torch.tensor([logits])
    return [int(sampler(ids, scores.clone()).argmax()) for _ in range(n)]


def test_a_verified_draw_follows_the_distribution_restricted_to_what_the_verifier_accepts():
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0]
    verifier = Refuses({0, 2})
    n = 4000
    got = _draws(logits, RowSampling(temperature=1.0, seed=7), verifier, n)
    kept = [i for i in range(len(logits)) if i not in verifier.refused]
    z = sum(math.exp(logits[i]) for i in kept)
    assert not set(got) & verifier.refused
    for i in kept:  # 4,000 seeded draws: the standard error of each share is under 0.008
        assert abs(got.count(i) / n - math.exp(logits[i]) / z) < 0.025, (i, got.count(i) / n)
    assert verifier.rescues == 0 and verifier.asked < 2 * n  # a refused draw is redrawn, not rescued


def test_the_rescue_takes_over_when_the_nucleus_or_the_greedy_choice_is_refused():
    logits = [3.0, 2.0, 1.0, 0.0]
    top2 = _draws(logits, RowSampling(temperature=1.0, top_k=2, seed=1), Refuses({0, 1}), 20)
    assert set(top2) == {2}  # both top-k tokens refused: the best accepted token outside them
    assert _draws(logits, RowSampling(temperature=0.0), Refuses({0}), 3) == [1, 1, 1]
    assert _draws(logits, RowSampling(temperature=0.0), None, 1) == [0]
