"""MMLU the paper's way: OpenCompass's mmlu_ppl_ac766d prompts byte for byte (reference copy of its config and
retriever/inferencer code), both data layouts, the scorer against a direct _get_ppl, summaries and predictions."""

from __future__ import annotations

import copy
import json

import opencompass_reference as oc
import pytest
from test_eval_scoring import LetterModel

from chatmusician.eval import mmlu_ppl, predictions, replica, scoring
from chatmusician.eval.config import MMLU_CSV_FIXTURE, MMLU_FIXTURE, EvalConfig
from chatmusician.eval.runner import mmlu_items, mmlu_results


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from chatmusician.model.loading import load_model, load_tokenizer

    return load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def data():
    return mmlu_ppl.load(MMLU_CSV_FIXTURE)


def test_hendrycks_csv_and_the_cais_schema_read_the_same_rows(data):
    assert data == mmlu_ppl.load(MMLU_FIXTURE)
    assert sorted(data) == ["high_school_mathematics", "world_religions"]
    assert [len(data[s]["test"]) for s in sorted(data)] == [4, 3]
    quoted = data["world_religions"]["test"][2]  # csv quoting: commas, doubled quotes, a line break
    assert quoted["input"] == 'Which book holds the words "love your neighbour, as yourself"?\nChoose one.'
    assert (quoted["A"], quoted["target"]) == ("The Bible", "A")


def test_hint_has_the_originals_two_spaces():
    assert mmlu_ppl.hint("world_religions") == (
        "The following are multiple choice questions (with answers) about  world religions.\n\n"
    )


@pytest.mark.parametrize("max_seq_len", [2048, 70])
def test_prompts_are_mmlu_ppl_ac766d_byte_for_byte(tiny, data, max_seq_len):
    _, tokenizer = tiny

    def token_len(text):  # OpenCompass's get_token_len: tokenizer.encode
        return len(tokenizer.encode(text))

    dropped = 0
    for subject, splits in data.items():
        ice_template, prompt_template = oc.mmlu_ppl_ac766d(subject)
        expected = oc.ppl_prompts(
            splits["test"],
            splits["dev"],
            [0, 1, 2, 3, 4],
            ice_template,
            prompt_template,
            token_len,
            max_seq_len,
        )
        for i, q in enumerate(splits["test"]):
            texts, kept, _ = mmlu_ppl.candidates(subject, q, splits["dev"][:5], token_len, max_seq_len)
            assert texts == [expected[x][i] for x in "ABCD"]
            dropped += kept[-1] < 5
    # 2048: every shot kept; 70 tokens: shots dropped (down to none: the "\n" OpenCompass leaves)
    assert (dropped == 0) if max_seq_len == 2048 else dropped == 7


def test_scores_equal_a_direct_opencompass_get_ppl(tiny, data, tiny_model_path):
    model, tokenizer = tiny
    pad = oc.pad_token_id(tiny_model_path)
    subject = "world_religions"
    shots = data[subject]["dev"][:5]
    # float64 on the question with the quoted two-line stem: agreement to rounding (1e-9)
    texts = mmlu_ppl.candidates(subject, data[subject]["test"][2], shots)[0]
    model64 = copy.deepcopy(model).double()
    (one,) = scoring.one_pass(model64, tokenizer, [texts], 2048)
    assert one.method == "one_pass"
    assert one.scores == pytest.approx(oc.get_ppl(model64, tokenizer, texts, pad, 2048), abs=1e-9)
    # and through the replica's work items (float32, how it runs), the subject's every question
    cfg = EvalConfig(model="unused")
    items = mmlu_items({subject: data[subject]}, 5)
    results = replica.process(model, tokenizer, items, cfg)
    assert len(results) == 3
    for item, res in zip(items, results, strict=True):
        payload = json.loads(item["payload"])
        texts = mmlu_ppl.candidates(payload["subject"], payload["question"], payload["shots"])[0]
        assert json.loads(res["result"])["scores"] == pytest.approx(
            oc.get_ppl(model, tokenizer, texts, pad, 2048), abs=1e-5
        )


def test_accuracy_means_and_opencompass_predictions_files(tiny, data):
    _, tokenizer = tiny
    favourite = tokenizer("Answer: C", add_special_tokens=False)["input_ids"][-1]
    model = LetterModel(len(tokenizer), favourite)
    cfg = EvalConfig(model="unused")
    cfg.mmlu.enabled = True
    out = mmlu_results(cfg, data, replica.process(model, tokenizer, mmlu_items(data, 5), cfg))
    # golds: mathematics C, C, A, B; world religions A, B, A -> a model that always says C
    assert out["subjects"] == {"high_school_mathematics": 0.5, "world_religions": 0.0}
    assert out["unweighted"] == pytest.approx(0.25)  # OpenCompass's mmlu summary: the mean of the subjects
    assert out["weighted"] == pytest.approx(2 / 7)
    assert out["one_pass_share"] == 1.0 and out["safe_format"]["questions_changed"] == 0
    files = predictions.mmlu_files(cfg, data, out)
    table = files["predictions/mmlu/high_school_mathematics.json"]
    assert list(table) == ["0", "1", "2", "3"]
    row = table["1"]
    ice_template, prompt_template = oc.mmlu_ppl_ac766d("high_school_mathematics")
    dev, test = data["high_school_mathematics"]["dev"], data["high_school_mathematics"]["test"]
    ice = oc.generate_ice(dev[:5], ice_template)
    assert row["in-context examples"] == ice
    for x in "ABCD":
        prompt = oc.generate_label_prompt_item(prompt_template, test[1], ice, x)
        assert row[f"label: {x}"]["prompt"] == prompt
        assert row[f"label: {x}"]["testing input"] == prompt.replace(ice, "")
    assert [row[f"label: {x}"]["PPL"] for x in "ABCD"] == out["answers_detail"][1]["scores"]
    assert (row["prediction"], row["gold"]) == ("C", "C")


def test_a_question_holding_a_column_name_is_filled_as_opencompass_fills_it(data):
    q = {"input": "Which is {A} here?", "A": "x{B}", "B": "y", "C": "z", "D": "w", "target": "A"}
    ice_template, prompt_template = oc.mmlu_ppl_ac766d("logic")
    texts = mmlu_ppl.candidates("logic", q, [])[0]
    assert texts[0] == oc.generate_label_prompt_item(prompt_template, q, "\n", "A")
    assert "Which is xy here?\nA. xy\n" in texts[0]


def test_the_lm_eval_cross_check_reads_both_layouts_too(tmp_path):
    from chatmusician.eval import mmlu

    (tmp_path / "csv").mkdir()
    (tmp_path / "hf").mkdir()
    from_csv = mmlu.local_mmlu_tasks(MMLU_CSV_FIXTURE, tmp_path / "csv")
    from_hf = mmlu.local_mmlu_tasks(MMLU_FIXTURE, tmp_path / "hf")
    assert [t["task"] for t in from_csv] == ["cm_mmlu_high_school_mathematics", "cm_mmlu_world_religions"]
    for a, b in zip(from_csv, from_hf, strict=True):
        for split in ("dev", "test"):
            rows = [json.loads(line) for line in open(a["dataset_kwargs"]["data_files"][split])]
            assert rows == [json.loads(line) for line in open(b["dataset_kwargs"]["data_files"][split])]
    original = [json.loads(line) for line in open(f"{MMLU_FIXTURE}/test.jsonl")]
    written = [json.loads(line) for t in from_csv for line in open(t["dataset_kwargs"]["data_files"]["test"])]
    assert sorted(written, key=json.dumps) == sorted(original, key=json.dumps)
