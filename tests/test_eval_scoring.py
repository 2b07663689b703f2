"""PPL scoring: one pass equals four passes equals a direct re-implementation of OpenCompass's rule; accuracy is
exactly what a model with known preferences must get; generation answers and format errors are counted."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import opencompass_reference as oc
import pytest
import torch

from chatmusician.eval import mtb, replica, scoring
from chatmusician.eval.config import MTB_FIXTURE, EvalConfig
from chatmusician.eval.runner import mtb_items, mtb_results

OC_PAD: list[int] = []  # OpenCompass's pad id for the tiny tokenizer, from its own files


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from chatmusician.model.loading import load_model, load_tokenizer

    OC_PAD[:] = [oc.pad_token_id(tiny_model_path)]
    return load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def questions():
    return mtb.load_questions(MTB_FIXTURE)


def direct_opencompass(model, tokenizer, text: str, max_seq_len: int | None = None) -> float:
    """OpenCompass's HuggingFace._get_ppl for one text, written out plainly (batch_padding=False)."""
    kwargs = {"truncation": True, "max_length": max_seq_len} if max_seq_len else {}
    ids = torch.tensor([tokenizer(text, **kwargs)["input_ids"]])
    pad = OC_PAD[0] if OC_PAD else tokenizer.eos_token_id
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    labels = ids[0, 1:]
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=pad)
    return float(ce.sum() / (ids[0] != pad).sum())


def candidates_of(tokenizer, test, shots, max_seq_len=2048):
    def token_len(t):
        return len(tokenizer(t)["input_ids"])

    return [mtb.candidate_texts(q, shots, token_len, max_seq_len) for q in test]


@pytest.mark.parametrize("few_shot", [False, True])
def test_one_pass_equals_four_pass_and_the_direct_method(tiny, questions, few_shot):
    model, tokenizer = tiny
    dev, test = questions
    # few-shot prompts are ~8x longer: a knowledge and two reasoning questions (two with ABC scores) suffice
    test = [test[i] for i in (range(len(test)) if not few_shot else (0, 6, 7))]
    cands = candidates_of(tokenizer, test, dev if few_shot else [])
    # float64: the three computations agree to rounding (the 1e-6 proof), on the first and last question
    model64 = copy.deepcopy(model).double()
    picked = [cands[0], cands[-1]]
    four = scoring.four_pass(model64, tokenizer, picked, 2048)
    one = scoring.one_pass(model64, tokenizer, picked, 2048)
    direct = [[direct_opencompass(model64, tokenizer, t, 2048) for t in texts] for texts in picked]
    assert all(s.method == "one_pass" for s in one)  # the tiny tokenizer gives "▁A".."▁D" after "Answer:"
    for a, b, d in zip(four, one, direct, strict=True):
        assert a.scores == pytest.approx(d, abs=1e-9)
        assert b.scores == pytest.approx(d, abs=1e-9)
    # float32 (how it runs): within 1e-5 and the same predictions
    four32 = scoring.four_pass(model, tokenizer, cands, 2048)
    one32 = scoring.one_pass(model, tokenizer, cands, 2048)
    for a, b in zip(four32, one32, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)
    assert [s.pred for s in four32] == [s.pred for s in one32]
    assert [four32[0].pred, four32[-1].pred] == [s.pred for s in four]


def test_fallback_where_candidates_do_not_share_a_prefix(tiny):
    model, tokenizer = tiny
    base = "Which chord?\nAnswer: "
    cands = [[base + x for x in ("A", "Bb major seventh", "C", "D")], [base + x for x in "ABCD"]]
    out = scoring.one_pass(model, tokenizer, cands)
    assert [s.method for s in out] == ["four_pass", "one_pass"]
    for s, texts in zip(out, cands, strict=True):
        assert s.scores == pytest.approx([direct_opencompass(model, tokenizer, t) for t in texts], abs=1e-5)
    rows = [[5, 6, 7], [5, 6, 8], [5, 6, 9], [5, 6, 9]]
    assert scoring.shared_prefix(rows, pad_id=0) is None  # two candidates end alike
    assert scoring.shared_prefix([[5, 6, 7], [5, 6, 8]], pad_id=8) is None  # a letter equal to the pad id
    assert scoring.shared_prefix([[5, 6, 7], [5, 4, 8]], pad_id=0) is None


def test_truncation_cuts_the_end_so_all_candidates_tie_and_a_wins(tiny, questions):
    model, tokenizer = tiny
    _, test = questions
    cands = candidates_of(tokenizer, test[:2], [], max_seq_len=20)
    out = scoring.one_pass(model, tokenizer, cands, max_seq_len=20)
    for s, texts in zip(out, cands, strict=True):
        assert s.method == "four_pass"
        assert s.scores == pytest.approx(
            [direct_opencompass(model, tokenizer, t, 20) for t in texts], abs=1e-5
        )
        assert len(set(s.scores)) == 1 and s.pred == 0  # OpenCompass: min() -> the first on ties


def test_bos_counts_in_the_length_when_the_tokenizer_adds_one(tiny_model_path, tiny, questions):
    from chatmusician.model.loading import load_tokenizer

    model, _ = tiny
    tokenizer = load_tokenizer(tiny_model_path, add_bos_token=True)
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    _, test = questions
    cands = candidates_of(tokenizer, test[:3], [])
    one = scoring.one_pass(model, tokenizer, cands)
    assert all(s.method == "one_pass" for s in one)
    for s, texts in zip(one, cands, strict=True):
        assert s.scores == pytest.approx([direct_opencompass(model, tokenizer, t) for t in texts], abs=1e-5)


class LetterModel(torch.nn.Module):
    """Logits we control: every position predicts ``favourite`` (one token) far above everything else."""

    def __init__(self, vocab_size: int, favourite: int):
        super().__init__()
        self.vocab_size, self.favourite = vocab_size, favourite
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.favourite] = 10.0
        return SimpleNamespace(logits=logits + self.anchor)


@pytest.mark.parametrize("shuffles", [0, 5])
def test_accuracy_is_exactly_the_share_of_questions_whose_gold_is_the_favourite(tiny, questions, shuffles):
    _, tokenizer = tiny
    dev, test = questions
    favourite = tokenizer("Answer: C", add_special_tokens=False)["input_ids"][-1]
    model = LetterModel(len(tokenizer), favourite)
    cfg = EvalConfig(model="unused")
    cfg.mtb.modes, cfg.mtb.shuffles, cfg.mtb.bootstrap = ["ppl_zero_shot", "ppl_few_shot"], shuffles, 200
    items = mtb_items(dev, test, cfg.mtb.modes, shuffles, cfg.mtb.seed)
    out = mtb_results(cfg, test, replica.process(model, tokenizer, items, cfg))
    # Expected, from the permutations alone: the share of (question, shuffle) whose shown gold letter is C.
    golds = [
        mtb.shuffle_question(q, mtb.permutation(q["id"], k, cfg.mtb.seed))["target"]
        for k in mtb.shuffle_ids(shuffles)
        for q in test
    ]
    original = sum(q["target"] == "C" for q in test) / len(test)
    assert original == 2 / 12
    for mode in cfg.mtb.modes:
        assert out[mode]["original"]["accuracy"] == pytest.approx(original)  # always reported
        assert out[mode]["one_pass_share"] == 1.0
        assert {r["pred"] for r in out[mode]["answers_detail"]} == {"C"}
    if shuffles == 0:
        assert "shuffled" not in out["ppl_zero_shot"]
    else:
        shuffled = golds[len(test) :]  # the seeded orders only, apart from the original
        r = out["ppl_zero_shot"]["shuffled"]
        assert r["accuracy"] == pytest.approx(shuffled.count("C") / len(shuffled))
        assert len(r["shuffle_accuracy"]) == 5
        assert sum(r["shuffle_accuracy"]) / 5 == pytest.approx(r["accuracy"])


def test_generation_mode_counts_format_errors_apart_from_wrong_answers(tiny, questions, monkeypatch):
    model, tokenizer = tiny
    dev, test = questions
    test = test[:4]  # golds C, A, C, B
    canned = ["Answer: C", "(B)", "I am not sure.", "B."]
    seen = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return canned[: len(prompts)]

    monkeypatch.setattr(replica, "generate", fake_generate)
    cfg = EvalConfig(model="unused")
    cfg.mtb.modes, cfg.mtb.bootstrap = ["gen_few_shot"], 100
    out = mtb_results(
        cfg, test, replica.process(model, tokenizer, mtb_items(dev, test, cfg.mtb.modes, 0, 0), cfg)
    )
    r = out["gen_few_shot"]["original"]
    assert [a["pred"] for a in out["gen_few_shot"]["answers_detail"]] == ["C", "B", None, "B"]
    assert (r["accuracy"], r["format_errors"], r["wrong"]) == (0.5, 1, 1)
    # the original's chat template, the dev rows as earlier turns
    assert seen[0].startswith("Human: " + mtb.HINT + "\n" + dev[0]["input"])
    assert " </s> Assistant: Answer: C </s> Human: " in seen[0]
    assert seen[0].endswith("\nD. " + test[0]["D"] + " </s> Assistant: ")
    assert json.loads(mtb_items(dev, test, ["gen_few_shot"], 0, 0)[0]["payload"])["shots"] == dev[:5]


def test_the_ignored_id_is_the_tokenizers_own_pad_else_eos_not_the_loaders_unk(tiny):
    model, tokenizer = tiny
    # the loader pads with <unk> for training; OpenCompass ignores the tokenizer's own pad, else EOS
    assert tokenizer.pad_token_id == tokenizer.unk_token_id != tokenizer.eos_token_id
    assert scoring.pad_id_of(tokenizer) == OC_PAD[0] == tokenizer.eos_token_id
    # a prompt holding the texts <unk> and </s> (as ABC or web text can): <unk> is scored, </s> is not
    texts = [f"Q: <unk> then </s> ok\nAnswer: {x}" for x in "ABCD"]
    ids = tokenizer(texts[0])["input_ids"]
    assert tokenizer.unk_token_id in ids and tokenizer.eos_token_id in ids
    (got,) = scoring.one_pass(model, tokenizer, [texts])
    direct = oc.get_ppl(model, tokenizer, texts, OC_PAD[0], None)
    assert got.scores == pytest.approx(direct, abs=1e-5)
    unk_ignored = oc.get_ppl(model, tokenizer, texts, tokenizer.unk_token_id, None)
    assert all(abs(a - b) > 1e-4 for a, b in zip(got.scores, unk_ignored, strict=True))
