"""MusicTheoryBench logic: the original's strings (pinned), loading, truncation, shuffles, letters, summaries."""

from __future__ import annotations

import json
import math

import opencompass_reference as oc
import pytest

from chatmusician.eval import mtb
from chatmusician.eval.config import MTB_FIXTURE

# The literal strings of hf-lin/ChatMusician eval/configs/datasets/music_theory_bench/*_ppl_*.py and
# eval/opencompass/datasets/music_theory_bench.py.
ORIGINAL_HINT = (
    "Read the following questions from the four options (A, B, C and D) given in each question. "
    "Choose the best option."
)
ORIGINAL_ABC_SENTENCE = "Use the example below to answer the question that follows."

ROW = {
    "id": "q1",
    "instruction": "",
    "stem": "Use the example below to answer the question that follows. What is the meter?",
    "options": {"A": "2/4", "B": "3/4", "C": "4/4", "D": "6/8"},
    "subject": "reasoning",
    "answer": "B",
    "abc_score": "X:1\nM:3/4\nK:C\nC D E |]",
    "analysis": "",
}


def test_original_strings_are_pinned():
    assert mtb.HINT == ORIGINAL_HINT
    assert mtb.ABC_SENTENCE == ORIGINAL_ABC_SENTENCE


def test_abc_score_merge_as_the_original_loader():
    q = mtb.convert_row(ROW)
    assert q["input"] == "What is the meter?\nX:1\nM:3/4\nK:C\nC D E |]"
    assert (q["A"], q["B"], q["C"], q["D"], q["target"]) == ("2/4", "3/4", "4/4", "6/8", "B")
    plain = mtb.convert_row({**ROW, "abc_score": "", "stem": "  Which clef? "})
    assert plain["input"] == "  Which clef? "  # no abc_score: the stem is left exactly as it is


def test_zero_and_few_shot_candidates_are_the_opencompass_strings():
    q = mtb.convert_row(ROW)
    block = "What is the meter?\nX:1\nM:3/4\nK:C\nC D E |]\nA. 2/4\nB. 3/4\nC. 4/4\nD. 6/8\nAnswer: "
    assert mtb.candidate_text(q, "C") == ORIGINAL_HINT + "\n" + block + "C"
    shot = {"input": "S?", "A": "a", "B": "b", "C": "c", "D": "d", "target": "D"}
    few = mtb.candidate_text(q, "A", [shot, {**shot, "target": "A"}])
    ice = "S?\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n" + "\n" + "S?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n" + "\n"
    assert few == ORIGINAL_HINT + "\n" + ice + block + "A"
    assert mtb.candidate_texts(q) == [mtb.candidate_text(q, x) for x in "ABCD"]


def test_fixture_loads_in_the_dataset_card_schema_from_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    dev, test = mtb.load_questions(MTB_FIXTURE)
    assert len(dev) == 5 and len(test) == 12
    assert {q["subject"] for q in test} == {"knowledge", "reasoning"}
    merged = [q for q in test if "X:1" in q["input"]]
    assert merged and all(ORIGINAL_ABC_SENTENCE not in q["input"] for q in merged)
    rows = mtb.load_rows(MTB_FIXTURE)
    assert set(rows["test"][0]) == set(mtb.FIELDS)
    for split, split_rows in rows.items():  # the hub's layout: data/<split>-00000-of-00001.parquet
        (tmp_path / "data").mkdir(exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(split_rows), tmp_path / "data" / f"{split}-00000-of-00001.parquet"
        )
    assert mtb.load_questions(str(tmp_path)) == (dev, test)
    only = mtb.load_questions(MTB_FIXTURE, subjects=["knowledge"], limit=4)[1]
    assert [q["id"] for q in only] == ["test-0", "test-1", "test-2", "test-3"]


def test_bad_rows_and_sources_are_clear_errors(tmp_path):
    with pytest.raises(mtb.MTBError, match="missing field"):
        mtb.convert_row({k: v for k, v in ROW.items() if k != "options"})
    with pytest.raises(mtb.MTBError, match="answer 'E'"):
        mtb.convert_row({**ROW, "answer": "E"})
    (tmp_path / "notes.jsonl").write_text(json.dumps(ROW) + "\n")
    with pytest.raises(mtb.MTBError, match="no test split"):
        mtb.load_rows(str(tmp_path))


def test_shots_are_dropped_from_the_end_per_candidate_and_carried_over():
    q = {"input": "Q", "A": "a", "B": "b", "C": "c", "D": "d", "target": "A"}
    shots = [{**q, "input": f"S{i}"} for i in range(3)]

    # A length function that makes candidate D one "token" longer than the others.
    def token_len(text):
        return len(text) + (5 if text.endswith("D") else 0)

    full = len(mtb.candidate_text(q, "A", shots))
    two = len(mtb.candidate_text(q, "A", shots[:2]))
    texts = mtb.candidate_texts(q, shots, token_len, max_seq_len=full)
    assert texts[:3] == [mtb.candidate_text(q, x, shots) for x in "ABC"]
    assert texts[3] == mtb.candidate_text(q, "D", shots[:2])  # D dropped one shot...
    assert two + 5 <= full
    # ...and a limit no shot count meets leaves zero shots (the scorer then cuts tokens), with OpenCompass's
    # "\n" where they were: generate_ice([]) is "" + ice_eos_token.
    dropped = mtb.candidate_texts(q, shots, len, max_seq_len=5)
    assert dropped == [ORIGINAL_HINT + "\n\nQ\nA. a\nB. b\nC. c\nD. d\nAnswer: " + x for x in "ABCD"]
    assert mtb.candidate_texts(q, [], len, max_seq_len=5) == [mtb.candidate_text(q, x) for x in "ABCD"]
    assert mtb.candidate_text(q, "A") == ORIGINAL_HINT + "\nQ\nA. a\nB. b\nC. c\nD. d\nAnswer: A"


def test_shuffles_are_seeded_and_move_the_gold_with_its_option():
    q = mtb.convert_row(ROW)
    perms = [mtb.permutation("q1", k, seed=0) for k in range(5)]
    assert perms == [mtb.permutation("q1", k, seed=0) for k in range(5)]
    assert perms != [mtb.permutation("q1", k, seed=1) for k in range(5)]
    assert mtb.permutation("q1", -1, 0) == [0, 1, 2, 3]
    for perm in perms:
        s = mtb.shuffle_question(q, perm)
        assert sorted(s[x] for x in "ABCD") == sorted(q[x] for x in "ABCD")
        assert s[s["target"]] == "3/4"
    # the original order (what the released configs score) is always in, beside the paper's 5 shuffles
    assert mtb.shuffle_ids(0) == [-1] and mtb.shuffle_ids(5) == [-1, 0, 1, 2, 3, 4]


ANSWERS = [
    "Answer: C", "The answer is (b).", "(C)", "C.", "c) because it is", "d", "I think option D is right",
    "A chord of three notes, so B", "no letter here", "A major scale has seven notes", "", "B or C",
    "The correct answer is \\boxed{D}", "答案是B", "1. C", "Answer:\nThe third one, C.", "  B  ", "It is D",
    "the answer: a", "Option (A) is correct", "E", "**B**",
]  # fmt: skip


@pytest.mark.parametrize("text", ANSWERS)
def test_generation_answers_are_read_as_opencompass_first_option_postprocess_reads_them(text):
    assert mtb.extract_letter(text) == (oc.first_option_postprocess(text, "ABCD") or None)


def test_first_option_postprocess_cases_worked_by_hand():
    # where the reader this replaces said "no letter": a letter ending the answer wins, then one standing alone
    assert mtb.extract_letter("B or C") == "C"
    assert mtb.extract_letter("A major scale has seven notes") == "A"
    assert mtb.extract_letter("The answer is (b).") is None  # lower case: no pattern reads it
    assert mtb.extract_letter("I think option D is right") == "D"


def test_summary_averages_shuffles_per_question_and_counts_format_errors_apart():
    records = []
    # q1 (knowledge): right in both shuffles; q2 (knowledge): right once; q3 (reasoning): wrong, then no letter.
    for shuffle, (p1, p2, p3) in enumerate([("A", "B", "C"), ("A", "D", None)]):
        records += [
            {"id": "q1", "subject": "knowledge", "shuffle": shuffle, "pred": p1, "target": "A"},
            {"id": "q2", "subject": "knowledge", "shuffle": shuffle, "pred": p2, "target": "B"},
            {"id": "q3", "subject": "reasoning", "shuffle": shuffle, "pred": p3, "target": "D"},
        ]
    s = mtb.summarize(records, ci_level=0.9, resamples=500, seed=0)
    assert s["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["shuffle_accuracy"] == pytest.approx([2 / 3, 1 / 3])
    assert s["shuffle_std"] == pytest.approx(math.sqrt(((2 / 3 - 0.5) ** 2 + (1 / 3 - 0.5) ** 2) / 1))
    assert s["subjects"] == {"knowledge": 0.75, "reasoning": 0.0}
    assert s["subject_mean"] == pytest.approx(0.375)  # unweighted over subjects, unlike accuracy (0.5)
    assert (s["format_errors"], s["wrong"], s["answers"], s["questions"]) == (1, 2, 6, 3)
    lo, hi = s["ci"]
    assert 0.0 <= lo <= s["accuracy"] <= hi <= 1.0 and hi > lo


def oc_row(row: dict) -> dict:
    """The original loader's row: the dataset's columns, then input, A..D, target (the review's column order)."""
    stem = row["stem"]
    if row["abc_score"]:
        stem = stem.replace(ORIGINAL_ABC_SENTENCE, "").strip() + "\n" + row["abc_score"]
    return {**row, "input": stem, **row["options"], "target": row["answer"]}


GRACE = {
    **ROW,
    "id": "q-grace",
    "stem": "Use the example below to answer the question that follows. Which note is ornamented?",
    "abc_score": "X:1\nM:3/4\nL:1/8\nK:C\n{A}B2 c2 {D}E2 |]",
    "options": {"A": "the B ({B} grace)", "B": "the E", "C": "the C", "D": "none"},
}


@pytest.mark.parametrize("few_shot", [False, True])
def test_templates_are_filled_by_opencompass_safe_format_also_inside_abc_grace_notes(few_shot):
    dev = [mtb.convert_row({**GRACE, "id": f"d{i}", "answer": "ABCD"[i % 4]}) for i in range(2)]
    q = mtb.convert_row(GRACE)
    expected = [oc.mtb_prompt(oc_row(GRACE), [oc_row({**GRACE, "answer": "ABCD"[i % 4]}) for i in range(2)], x, few_shot)
                for x in "ABCD"]  # fmt: skip
    got = mtb.candidate_texts(q, dev if few_shot else [], few_shot=few_shot)
    assert got == expected
    # the grace notes became option texts, and {B} inside option A became option B's text
    assert "the B (the E grace)B2 c2 noneE2" in got[0]
    assert "{A}" not in got[0] and "{D}" not in got[0]
    plain = mtb.candidate_texts(q, dev if few_shot else [], few_shot=few_shot, literal=False)
    assert "{A}B2 c2 {D}E2 |]" in plain[0] and "A. the B ({B} grace)" in plain[0]
    assert mtb.safe_format_changes(q, dev if few_shot else [], few_shot)
    assert not mtb.safe_format_changes(mtb.convert_row(ROW))


def test_few_shot_items_take_the_first_five_dev_rows_and_always_the_original_order():
    from chatmusician.eval.runner import mtb_items

    dev, test = mtb.load_questions(MTB_FIXTURE)
    dev7 = dev + [{**dev[0], "id": "dev-5"}, {**dev[1], "id": "dev-6"}]
    items = mtb_items(dev7, test[:2], ["ppl_few_shot", "ppl_zero_shot"], 2, 0)
    payloads = [json.loads(i["payload"]) for i in items]
    few = [p for p, i in zip(payloads, items, strict=True) if json.loads(i["key"])[0] == "ppl_few_shot"]
    assert all([s["id"] for s in p["shots"]] == [d["id"] for d in dev[:5]] for p in few)
    assert {json.loads(i["key"])[1] for i in items} == {-1, 0, 1}
    assert all(p["question"] == test[k] for p, k in zip(payloads[:2], (0, 1), strict=True))  # -1: as given


def test_results_count_the_questions_safe_format_changes_in_ppl_modes():
    from chatmusician.eval.config import EvalConfig
    from chatmusician.eval.report import markdown
    from chatmusician.eval.runner import mtb_results

    test = [mtb.convert_row(GRACE), mtb.convert_row(ROW)]
    cfg = EvalConfig(model="unused")
    cfg.mtb.modes, cfg.mtb.bootstrap = ["ppl_zero_shot", "gen_zero_shot"], 0
    results = [
        {
            "key": json.dumps([mode, -1, q["id"]]),
            "kind": "x",
            "result": json.dumps({"pred": "A", "text": "A"}),
        }
        for mode in cfg.mtb.modes
        for q in test
    ]
    out = mtb_results(cfg, test, results)
    assert out["ppl_zero_shot"]["safe_format"] == {"applied": True, "questions_changed": 1}
    assert (
        "safe_format" not in out["gen_zero_shot"]
    )  # the chat template is filled by this project, not a config
    assert "`safe_format` changes" in markdown({"model": "m", "mtb": out}) and "ppl_zero_shot 1" in markdown(
        {"model": "m", "mtb": out}
    )
