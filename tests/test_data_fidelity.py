"""Token ids held against the original's data_preprocess.py with LLaMA-2's real tokenizer conventions: the slow
SentencePiece tokenizer, ``legacy: True``, BOS added by default. No Ray.

The original (hf-lin/ChatMusician data_preprocess.py) loaded ``AutoTokenizer.from_pretrained(...,
use_fast=False)``; pt rows were ``tokenizer(text, add_special_tokens=False)``, sft rows ``tokenize(instruction +
input)`` and ``tokenize(output)`` cut to 1536 / ``2048 - 3 - len(source)``, ``</s>`` appended unless the output
ends with it, then ``convert_tokens_to_ids``. transformers 5 hands out no slow LLaMA class for
``use_fast=False``; its ``SentencePieceBackend`` is the same Python-over-sentencepiece tokenizer.
"""

from __future__ import annotations

import json
import shutil

import pytest

from chatmusician.config import load_config
from chatmusician.data.config import TokenizeConfig
from chatmusician.data.manifest import tokenizer_fingerprint
from chatmusician.data.tokenize import BackendTokenizer, process_batch, tokenizer_spec
from chatmusician.prompts import sft_source_target

TUNE = "X:1\nL:1/8\nM:6/8\nK:D\n|: A | dfa agf | e2d B2A :|"
PT_ROWS = [
    f"Human: Write a jig. </s> Assistant: {TUNE} </s> ",
    "  two leading spaces, then prose.\n\nA new paragraph\n",
    " one leading space: ünïcode, 日本語, café",
    "</s>text right after a special token <s> and <unk> inside",
    "\nX:2\nT:Tab\there\nK:G\n|GAB c2d|\n",
]
SFT_ROWS = [
    {"instruction": "Human: Write a jig. ", "input": " </s> ", "output": f"Assistant: {TUNE} </s> "},
    {"instruction": "Human: Name the key.\n", "input": f"{TUNE} </s> ", "output": "Assistant: D major"},
    {"instruction": "Human:  ünïcode   spaces", "input": "\n\n </s> ", "output": " Assistant:  x </s>"},
    {"instruction": "Human: long " * 300, "input": " </s> ", "output": "Assistant: " + "abc| " * 900},
]


def llama2_dir(tiny_model_path, tmp_path, legacy: bool):
    """The tiny model's SentencePiece model with LLaMA-2's tokenizer_config (BOS added, legacy as given)."""
    out = tmp_path / f"llama2-legacy-{legacy}"
    out.mkdir()
    shutil.copy(f"{tiny_model_path}/tokenizer.model", out / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": legacy,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)


def slow_tokenizer(path: str, legacy: bool):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend.from_pretrained(path, legacy=legacy, add_bos_token=True)


def original_pt(slow, text: str) -> list[int]:
    return slow(text, return_attention_mask=False, add_special_tokens=False)["input_ids"]


def original_sft(slow, row, max_len=2048, max_src_len=1536) -> tuple[list[int], list[int]]:
    src = slow.tokenize(row["instruction"] + row["input"])[:max_src_len]
    tgt = slow.tokenize(row["output"])[: max_len - 3 - len(src)]
    tokens = src + tgt + ([] if row["output"].strip().endswith("</s>") else ["</s>"])
    ids = slow.convert_tokens_to_ids(tokens)
    return ids, [-100] * len(src) + ids[len(src) :]


def _batch(rows):
    cols = ("row_id", "src", "reject", "repeats", "is_score", "text", "source", "target")
    return {c: [r.get(c, {"repeats": 1, "is_score": False}.get(c, "")) for r in rows] for c in cols}


def data_stage(cfg, fast):
    """What a tokenize task builds (from the spec the driver ships) and what the manifest says about it."""
    spec = tokenizer_spec(fast, cfg)
    return BackendTokenizer.from_spec(spec), spec["describe"]


def stage_pt(cfg, tok) -> list[list[int]]:
    rows = [{"row_id": f"r:{k}", "text": t} for k, t in enumerate(PT_ROWS)]
    return process_batch(_batch(rows), tok, cfg)["input_ids"].to_pylist()


def stage_sft(cfg, tok):
    pairs = [sft_source_target(r) for r in SFT_ROWS]
    rows = [{"row_id": f"s:{k}", "source": s, "target": t} for k, (s, t) in enumerate(pairs)]
    out = process_batch(_batch(rows), tok, cfg)
    return out["input_ids"].to_pylist(), out["labels"].to_pylist()


@pytest.fixture(scope="module")
def legacy_pair(tiny_model_path, tmp_path_factory):
    from chatmusician.model.loading import load_tokenizer

    path = llama2_dir(tiny_model_path, tmp_path_factory.mktemp("tok"), legacy=True)
    return path, load_tokenizer(path), slow_tokenizer(path, legacy=True)


def test_the_fast_tokenizer_alone_does_not_give_the_legacy_ids(legacy_pair):
    """The control: with LLaMA-2's legacy setting, fast and slow differ after </s> and at leading spaces."""
    _, fast, slow = legacy_pair
    differ = [t for t in PT_ROWS if fast(t, add_special_tokens=False).input_ids != original_pt(slow, t)]
    assert PT_ROWS[0] in differ and PT_ROWS[1] in differ and PT_ROWS[2] in differ
    assert fast("x").input_ids[0] == fast.bos_token_id  # BOS is on by default, as in LLaMA-2's config


@pytest.mark.parametrize("limits", [(2048, 1536), (64, 40), (16, 8)])
def test_the_data_stage_gives_the_originals_ids_with_llama2s_legacy_tokenizer(legacy_pair, limits):
    path, fast, slow = legacy_pair
    max_len, max_src = limits
    pt = load_config(TokenizeConfig, None, tokenizer=path, max_len=100_000, add_eos=False)
    tok, describe = data_stage(pt, fast)
    assert describe["encoder"] == "sentencepiece" and describe["ids"].startswith("original")
    assert stage_pt(pt, tok) == [original_pt(slow, t) for t in PT_ROWS]
    sft = load_config(
        TokenizeConfig, None, mode="sft", tokenizer=path, max_len=max_len, max_source_len=max_src
    )
    ids, labels = stage_sft(sft, tok)
    want = [original_sft(slow, r, max_len, max_src) for r in SFT_ROWS]
    assert ids == [i for i, _ in want] and labels == [lab for _, lab in want]
    assert all(row[0] != fast.bos_token_id for row in ids)  # never a BOS, as the original


def test_fast_ids_are_given_only_when_asked_and_the_manifest_says_so(legacy_pair):
    path, fast, slow = legacy_pair
    cfg = load_config(TokenizeConfig, None, tokenizer=path, max_len=100_000, add_eos=False, encoder="fast")
    tok, describe = data_stage(cfg, fast)
    assert describe["encoder"] == "fast" and "one space token fewer" in describe["ids"]
    assert stage_pt(cfg, tok) == [fast(t, add_special_tokens=False).input_ids for t in PT_ROWS]
    fingerprint = tokenizer_fingerprint(path, fast)
    assert fingerprint["legacy"] is True and fingerprint["add_bos_token"] is True
    assert fingerprint["bos_token_id"] == 1 and fingerprint["eos_token_id"] == 2


def test_a_tokenizer_without_legacy_gives_its_fast_ids_and_the_manifest_says_so(tiny_model_path, tmp_path):
    """No legacy, nothing to reproduce: the fast ids (those inference sees), named as such."""
    from chatmusician.model.loading import load_tokenizer

    path = llama2_dir(tiny_model_path, tmp_path, legacy=False)
    fast = load_tokenizer(path)
    cfg = load_config(TokenizeConfig, None, tokenizer=path, max_len=100_000, add_eos=False)
    tok, describe = data_stage(cfg, fast)
    assert describe["encoder"] == "fast" and "not legacy" in describe["ids"]
    assert stage_pt(cfg, tok) == [fast(t, add_special_tokens=False).input_ids for t in PT_ROWS]
    # legacy forced on by the config (a tokenizer_config without the key, read as the original's transformers did)
    forced = load_config(TokenizeConfig, None, tokenizer=path, max_len=100_000, add_eos=False, legacy=True)
    tok, describe = data_stage(forced, fast)
    assert describe["encoder"] == "sentencepiece"
    assert stage_pt(forced, tok) == [original_pt(slow_tokenizer(path, legacy=True), t) for t in PT_ROWS]


def test_shards_of_a_legacy_tokenizer_are_refused_by_a_run_whose_tokenizer_is_not(
    legacy_pair, tiny_model_path, tmp_path
):
    """The same vocabulary, another `legacy`: other ids after </s>, so the fingerprints differ and training refuses."""
    from chatmusician.data.manifest import MANIFEST_FORMAT, ShardMismatch, check_shards
    from chatmusician.model.loading import load_tokenizer

    path, fast, _ = legacy_pair
    other = llama2_dir(tiny_model_path, tmp_path, legacy=False)
    shards = {"format": MANIFEST_FORMAT, "max_len": 64, "tokenizer": tokenizer_fingerprint(path, fast)}
    run = tokenizer_fingerprint(other, load_tokenizer(other))
    assert run["vocab_size"] == shards["tokenizer"]["vocab_size"] and run["legacy"] is False
    with pytest.raises(ShardMismatch, match="tokenizer sha256"):
        check_shards(shards, tokenizer_fingerprint=run, max_length=64)
    check_shards(shards, tokenizer_fingerprint=tokenizer_fingerprint(path, fast), max_length=64)
