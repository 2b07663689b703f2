import json
from pathlib import Path

import pytest

from chatmusician import corpora
from chatmusician.model import tiny
from chatmusician.model.loading import count_parameters, load_model, load_tokenizer

ABC = 'X:1\nT:Drowsy Maggie\nM:4/4\nK:Edor\n|:E2BE dEBE|"D"D2FD ADFD:|\n'


def test_tokenizer_is_llama_style_and_fast_equals_sentencepiece(tiny_model_path):
    import sentencepiece as spm

    tok = load_tokenizer(tiny_model_path)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == tok.unk_token_id  # LLaMA has no pad: the original pads with <unk>
    sp = spm.SentencePieceProcessor(model_file=str(Path(tiny_model_path) / "tokenizer.model"))
    for text in (ABC, "The Dorian mode has a raised sixth.", "音乐 ♪ émoji 🎵 \t tabs"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text  # slow (sentencepiece) and fast paths agree
        assert tok.decode(ids) == text  # byte fallback: lossless on any text
    # The template's "</s>" is the EOS token, as in the original's LlamaTokenizer; no BOS is added.
    ids = tok("Human: hi </s> Assistant: ")["input_ids"]
    assert ids[0] != tok.bos_token_id and tok.eos_token_id in ids


def test_tokenizer_training_is_deterministic(tmp_path):
    a = tiny.train_tokenizer(tmp_path / "a")
    b = tiny.train_tokenizer(tmp_path / "b")
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    assert (
        json.loads((a / "tokenizer.json").read_text())["model"]
        == json.loads((b / "tokenizer.json").read_text())["model"]
    )


def test_tiny_sizes_and_generation(tiny_model_path):
    import torch

    model = load_model(tiny_model_path)
    trainable, total = count_parameters(model)
    assert 1_000_000 <= total <= 5_000_000 and trainable == total
    assert model.config.model_type == "llama"
    tok = load_tokenizer(tiny_model_path)
    inputs = tok("Human: hi </s> Assistant: ", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    # five new tokens, or fewer ending at the first EOS (generation stops there)
    assert 1 <= len(new) <= 5 and tok.eos_token_id not in new[:-1]
    assert len(new) == 5 or new[-1] == tok.eos_token_id
    assert tok.pad_token_id not in new
    with torch.no_grad():  # greedy decoding is deterministic
        again = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert again[0].tolist() == out[0].tolist()


def test_hub_id_and_local_path_take_the_same_code_path(tiny_model_path, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    import torch

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tiny.install_in_hub_cache(tiny_model_path, "chatmusician-test/tiny-llama", tmp_path / "hub")
    from_hub = load_model("chatmusician-test/tiny-llama", cache_dir=str(tmp_path / "hub"))
    from_path = load_model(tiny_model_path)
    for (name, a), (_, b) in zip(from_hub.state_dict().items(), from_path.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tok = load_tokenizer("chatmusician-test/tiny-llama", cache_dir=str(tmp_path / "hub"))
    assert tok(ABC)["input_ids"] == load_tokenizer(str(snapshot))(ABC)["input_ids"]
    with pytest.raises(OSError):  # offline: an unknown id is a clear error, never a download
        load_model("chatmusician-test/does-not-exist", cache_dir=str(tmp_path / "hub"))


def test_real_corpora_are_found():
    tunes = corpora.nottingham_tunes()
    assert len(tunes) == 1034
    assert all(t.startswith("X:") for t in tunes)
    assert len(corpora.music21_abc_files()) > 1000
