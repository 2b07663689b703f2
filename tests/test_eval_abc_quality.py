"""ABC quality metrics on tunes whose answers are known, the shipped prompt set, and the abc2midi check."""

from __future__ import annotations

import pytest

from chatmusician.eval import abc_quality as q

JIG = """X:1
T:Test jig
M:6/8
L:1/8
K:G
|:GAB cBA|BGE EDE|GAB cBA|BGE EDE:|
|:dBd ege|dBG G3|dBd ege|dBG G3:|"""


def test_a_good_jig_scores_as_requested():
    m = q.tune_metrics(
        "Here is your tune:\n" + JIG + "\n\nEnjoy!", {"key": "G", "meter": "6/8"}, midi_ok=True
    )
    assert m["found"] and m["syntax_ok"] and m["parse_success"]
    assert m["key_present"] and m["meter_present"] and m["key_as_requested"] and m["meter_as_requested"]
    assert m["has_repeats"] and m["bar_consistency"] == 1.0
    assert m["bars"] == 8 and m["distinct_bar_ratio"] == pytest.approx(4 / 8)
    # of the 7 bar pairs, (GAB cBA, BGE EDE) and (dBd ege, dBG G3) occur twice each
    assert m["repeated_bigram_share"] == pytest.approx(4 / 7)


def test_what_was_not_asked_for_or_not_music_is_counted_as_such():
    m = q.tune_metrics(JIG.replace("M:6/8", "M:3/4"), {"key": "D", "meter": "6/8"})
    assert not m["key_as_requested"] and not m["meter_as_requested"]  # 3/4 is not 6/8, though bars match
    assert m["bar_consistency"] == 1.0 and m["parse_success"]  # midi not checked: the validator decides
    short = q.tune_metrics(JIG.replace("BGE EDE:", "BGE ED:"), {})  # one inner bar an eighth short
    assert short["found"] and short["bar_consistency"] == pytest.approx(5 / 6)
    none = q.tune_metrics("I cannot write music, sorry.", {"key": "G"})
    assert none == {**none, "found": False, "parse_success": False, "key_as_requested": False}
    assert q.tune_metrics(JIG, {}, midi_ok=False)["parse_success"] is False


def test_real_tunes_are_consistent_and_their_requests_are_met():
    from chatmusician.abc import parse_tune
    from chatmusician.corpora import nottingham_tunes

    tunes = nottingham_tunes()[:40]
    rows = []
    for t in tunes:
        tune = parse_tune(t)
        request = {"key": tune.header("K"), "meter": tune.header("M")}
        rows.append({"family": "reference", "tokens": 0, **q.tune_metrics(t, request)})
    s = q.summarize(rows)["all"]
    assert s["tunes"] == 40 and s["found"] == 1.0
    assert s["key_as_requested"] == 1.0 and s["meter_as_requested"] == 1.0
    assert s["parse_success"] >= 0.95 and s["bar_consistency"] > 0.85 and s["has_repeats"] > 0.5


def test_prompt_set_covers_every_task_family():
    prompts = q.load_prompts()
    assert {p["family"] for p in prompts} == {
        "text_to_music",
        "chords",
        "form",
        "motif_form",
        "harmonize",
        "style",
    }
    jig = next(p for p in prompts if p["name"] == "jig-G")
    assert jig["prompt"].startswith("Using ABC notation, recreate the given text as a musical score.")
    assert jig["request"] == {"key": "G", "meter": "6/8", "unit_length": "1/8"}


def test_a_bad_prompt_file_names_the_problem(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"family": "chords", "fields": {}}\n')
    with pytest.raises(ValueError, match="needs field 'chords'"):
        q.load_prompts(bad)


@pytest.mark.integration
def test_midi_check_runs_abc2midi_in_the_sandbox():
    assert q.midi_check("Tune:\n" + JIG)
    assert not q.midi_check("no music here")


def test_constrained_generation_masks_before_each_rows_draw_with_each_prompts_request(
    monkeypatch, tiny_model_path
):
    import torch

    from chatmusician.abc.grammar import AbcConstraints
    from chatmusician.eval import replica
    from chatmusician.eval.config import EvalConfig
    from chatmusician.eval.runner import abc_items, abc_results
    from chatmusician.model import constrained_decoding as constrained
    from chatmusician.model.loading import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    only = tokenizer("G", add_special_tokens=False)["input_ids"][-1]
    calls = []

    class OnlyG:  # a "grammar" that allows one token: what comes out shows it ran before the draw
        def __call__(self, input_ids, scores):
            masked = torch.full_like(scores, float("-inf"))
            masked[:, only] = scores[:, only]
            return masked

        def accepts(self, row, token):  # the sampler's verifier: nothing more to check
            return True

    def fake_processor(tok, constraints, budget, meter_in_sampler=False):
        calls.append((list(constraints), budget))
        return OnlyG(), [None] * len(constraints)

    monkeypatch.setattr(constrained, "logits_processor", fake_processor)
    prompts = [p for p in q.load_prompts() if p["name"] in ("jig-G", "form-AABB")]
    cfg = EvalConfig(model="unused")
    cfg.abc_quality.constrained, cfg.abc_quality.check_midi, cfg.abc_quality.max_new_tokens = True, False, 6
    out = abc_results(cfg, prompts, replica.process(model, tokenizer, abc_items(prompts, 1, seed=3), cfg))
    ((constraints, budget),) = calls
    assert constraints == [
        AbcConstraints(key="G", meter="6/8", unit_length="1/8"),
        AbcConstraints(),
    ]  # form: no key
    assert budget == 6
    rows = {r["name"]: r for r in out["tunes_detail"]}
    assert rows["jig-G"]["text"] == tokenizer.decode([only] * 6) and rows["jig-G"]["tokens"] == 6
    assert out["constrained"] and out["all"]["found"] == 0.0
