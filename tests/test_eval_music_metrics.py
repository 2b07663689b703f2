"""The music metrics of the ABC quality section: NotaGen's bar-alignment error, MusPy's metrics (held against a
copy of MusPy's own functions and hand-worked values), diversity, memorisation, and per-item sampling seeds."""

from __future__ import annotations

import math
from fractions import Fraction

import muspy_reference as muspy
import pytest

from chatmusician.abc import parse_tune
from chatmusician.eval import abc_quality, music_metrics

JIG = """X:1
T:Test jig
M:6/8
L:1/8
K:G
|:GAB cBA|BGE EDE|GAB cBA|BGE EDE:|
|:dBd ege|dBG G3|dBd ege|dBG G3:|"""


def tune(body: str, meter: str = "4/4", unit: str = "1/8", key: str = "G"):
    return parse_tune(f"X:1\nM:{meter}\nL:{unit}\nK:{key}\n{body}")


@pytest.mark.parametrize(
    ("body", "unit", "expected"),
    [
        ("C|DEFG|ABcd|e3|]", "1/4", (0, 4)),  # a pickup and a short final bar are allowed
        ("C|DEF|ABcd|e3|]", "1/4", (1, 4)),  # a short inner bar is not
        ("|:G2|ABcd efga|[1 b6:|[2 b4 z2|]", "1/8", (0, 4)),  # a first-time bar completed by the repeat
        ("|:G2|ABcd efga|[1 b8 c:|[2 b4 z2|]", "1/8", (1, 4)),  # a volta bar one eighth too long
        ("|:G2|ABcd efga|ABcd efga ab|[2 b4 z2|]", "1/8", (1, 4)),
        ("Z2|ABcd efga|]", "1/8", (0, 1)),  # measure rests are full by definition
    ],
)
def test_bar_alignment_error_counts_bars_that_disagree_with_the_meter(body, unit, expected):
    t = tune(body, unit=unit)
    assert music_metrics.bar_alignment(t) == expected
    assert music_metrics.bar_alignment_error(t) == expected[0] / expected[1]


def test_bar_alignment_follows_inline_meter_and_unit_changes_and_free_meter_is_not_checked():
    assert music_metrics.bar_alignment(tune("ABcd efga|[M:3/4] ABc def|[L:1/4] ABC|]")) == (0, 3)
    assert music_metrics.bar_alignment_error(tune("ABcd efga|ABc|]", meter="none")) is None


def test_notes_apply_key_accidentals_ties_chords_tuplets_and_leave_grace_notes_out():
    ns = music_metrics.notes(tune("f2 ^c c {g}d2- | d2 [CEG]2 (3ABc | z6 | =f |]", meter="3/4"))
    w = Fraction
    assert [(n.pitch, n.onset, n.duration) for n in ns] == [
        (78, w(0), w(1, 4)),  # f is F# in G major; MIDI: ABC "C" is middle C (60)
        (73, w(1, 4), w(1, 8)),
        (73, w(3, 8), w(1, 8)),  # the bar's sharp carries over
        (74, w(1, 2), w(1, 2)),  # d2-|d2: one tied note, the grace g left out
        (60, w(1), w(1, 4)),
        (64, w(1), w(1, 4)),
        (67, w(1), w(1, 4)),  # a chord: one onset
        (69, w(5, 4), w(1, 12)),
        (71, w(4, 3), w(1, 12)),
        (72, w(17, 12), w(1, 12)),  # a triplet of eighths in a quarter
        (77, w(9, 4), w(1, 8)),  # after a bar of rest; =f is F natural
    ]


def test_muspy_metrics_worked_by_hand_on_a_scale():
    m = music_metrics.muspy_metrics(tune("C D E F | G A B c |]", unit="1/4", key="C"))
    assert m["pitch_range"] == 12
    # classes C twice, six others once: -(1/4 log2 1/4 + 6/8 log2 1/8) = 0.5 + 2.25
    assert m["pitch_class_entropy"] == pytest.approx(2.75)
    assert m["scale_consistency"] == 1.0
    assert m["empty_beat_rate"] == 0.0
    # MusPy counts length // 96 + 1 = 3 bars; the third is empty: 4 onsets differ over 2 x 96 steps
    assert m["groove_consistency"] == pytest.approx(1 - 4 / 192)
    chromatic = music_metrics.muspy_metrics(tune("C ^C D z | z4 | z4 | C4 |]", unit="1/4", key="C"))
    assert chromatic["scale_consistency"] == pytest.approx(3 / 4)  # no major or minor scale holds C, C#, D
    # 16 beats + 1 (MusPy); a note marks the beats of its onset and of its end: beats 4-11 stay silent
    assert chromatic["empty_beat_rate"] == pytest.approx(8 / 17)


def to_muspy(ns):
    ticks = [(music_metrics._ticks(n.onset), music_metrics._ticks(n.duration), n.pitch) for n in ns]
    return muspy.Music([muspy.Track([muspy.Note(t, p, d) for t, d, p in ticks])])


def test_muspy_metrics_equal_muspys_own_functions_on_real_tunes():
    from chatmusician.corpora import nottingham_tunes

    for text in nottingham_tunes()[:40]:
        t = parse_tune(text)
        ns = music_metrics.notes(t)
        music = to_muspy(ns)
        got = music_metrics.muspy_metrics(t)
        assert got["pitch_range"] == muspy.pitch_range(music)
        assert got["pitch_class_entropy"] == pytest.approx(float(muspy.pitch_class_entropy(music)))
        assert got["scale_consistency"] == pytest.approx(muspy.scale_consistency(music))
        assert got["empty_beat_rate"] == pytest.approx(muspy.empty_beat_rate(music))
        expected = muspy.groove_consistency(music, music_metrics._ticks(t.meter))
        assert (math.isnan(got["groove_consistency"]) and math.isnan(expected)) or got[
            "groove_consistency"
        ] == pytest.approx(float(expected))
    empty = to_muspy([])
    empty.tracks[0].notes = []
    assert music_metrics.pitch_range([]) == muspy.pitch_range(empty) == 0
    assert math.isnan(music_metrics.scale_consistency([])) and math.isnan(muspy.scale_consistency(empty))


def test_unit_as_requested_reads_l_or_the_standards_default():
    rows = {
        "1/8 given": abc_quality.tune_metrics(JIG, {"unit_length": "1/8"}),
        "1/16 asked": abc_quality.tune_metrics(JIG, {"unit_length": "1/16"}),
        "default in 2/4": abc_quality.tune_metrics("X:1\nM:2/4\nK:C\nCDEF|]", {"unit_length": "1/16"}),
    }
    assert [r["unit_as_requested"] for r in rows.values()] == [True, False, True]


def test_diversity_over_a_prompts_samples():
    other = JIG.replace("GAB cBA", "ABc dcB")
    rows = [
        {"name": "same", **abc_quality.tune_metrics(JIG)},
        {"name": "same", **abc_quality.tune_metrics(JIG)},
        {"name": "mixed", **abc_quality.tune_metrics(JIG)},
        {"name": "mixed", **abc_quality.tune_metrics(other)},
        {"name": "mixed", **abc_quality.tune_metrics("no tune here")},
    ]
    abc_quality.diversity(rows, 4)
    same, mixed = rows[0], rows[2]
    assert same["self_similarity"] == 1.0
    one = music_metrics.distinct_n([rows[0]["music_tokens"]], 4)
    assert same["distinct_n"] == pytest.approx(one / 2)  # two copies: every 4-gram twice as often
    # the text with no tune takes no part: one pair, the two tunes' bodies
    pair = music_metrics.similarity(rows[2]["body"], rows[3]["body"])
    assert mixed["self_similarity"] == pytest.approx(pair) and 0.5 < pair < 1
    assert one / 2 < mixed["distinct_n"] and rows[4]["distinct_n"] == mixed["distinct_n"]
    assert music_metrics.similarity("abcd", "abXd") == 0.75


def test_memorisation_finds_a_copied_training_tune_past_headers_and_spacing(tmp_path):
    from chatmusician.corpora import nottingham_tunes

    train = nottingham_tunes()[:300]
    (tmp_path / "train.abc").write_text("\n\n".join(train))
    bodies = abc_quality.load_train_tunes(tmp_path / "train.abc")
    assert len(bodies) == 300
    copied = parse_tune(train[123])
    respaced = "X:9\nT:My own tune\nM:" + (copied.header("M") or "4/4") + "\nK:" + (copied.header("K") or "C")
    respaced += "\n" + " ".join(copied.body.replace("\n", " \n").split(" "))
    rows = [{"found": True, **abc_quality.tune_metrics(respaced)}, {**abc_quality.tune_metrics(JIG)}]
    abc_quality.memorisation(rows, bodies)
    assert rows[0]["nearest_train_index"] == 123 and rows[0]["nearest_train_similarity"] == 1.0
    assert rows[0]["memorised"] and not rows[1]["memorised"] and rows[1]["nearest_train_similarity"] < 0.95


def test_each_item_samples_from_its_own_seed_whatever_shares_its_batch(tiny_model_path):
    from chatmusician.eval.generation import generate_counted, sampling_kwargs
    from chatmusician.model.loading import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    kwargs = sampling_kwargs(12, temperature=1.0, top_p=1.0, top_k=0)
    prompts = ["Human: Write a jig. </s> Assistant: ", "Human: A reel in D, please </s> Assistant: ", "X"]
    batch = generate_counted(model, tokenizer, prompts, seeds=[5, 6, 7], **kwargs)
    alone = generate_counted(model, tokenizer, prompts[1:2], seeds=[6], **kwargs)
    reordered = generate_counted(model, tokenizer, [prompts[2], prompts[0]], seeds=[7, 5], **kwargs)
    assert alone == [batch[1]]
    assert reordered == [batch[2], batch[0]]
    again = generate_counted(model, tokenizer, prompts[1:2], seeds=[8], **kwargs)
    assert again != alone  # the seed, not the batch, decides


def test_the_models_own_generation_config_does_not_stack_on_the_samplers_settings(tiny_model_path):
    from chatmusician.eval.generation import generate_counted, sampling_kwargs
    from chatmusician.model.loading import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    prompts = ["Human: Write a jig. </s> Assistant: "]
    kwargs = sampling_kwargs(16)  # greedy, no penalty
    plain = generate_counted(model, tokenizer, prompts, **kwargs)
    model.generation_config.repetition_penalty = 50.0  # as a checkpoint's generation_config.json may say
    model.generation_config.no_repeat_ngram_size = 1
    assert generate_counted(model, tokenizer, prompts, **kwargs) == plain
