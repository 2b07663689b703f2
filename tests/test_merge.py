"""``chatmusician merge``: adapter -> full HF model whose greedy generations equal base + adapter's."""

from __future__ import annotations

import pytest
import torch

from chatmusician.model.merge import MergeError, merge_adapter
from chatmusician.train.config import LoraConfig

PROMPT = "Human: Write a reel in D major. </s> Assistant: X:1\nT:"


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_path):
    """A LoRA adapter (with modules_to_save) whose weights are far from the identity, as after training."""
    from chatmusician.model.loading import load_model
    from chatmusician.model.lora import apply_lora

    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_model_path), LoraConfig(r=8, alpha=16))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # lora_A/B and the trainable copies of embed_tokens / lm_head
                param.add_(torch.randn_like(param) * (0.05 if "lora_" in name else 0.02))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out, safe_serialization=True)
    return out


def _greedy(model, tokenizer, n=24):
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_merged_model_generates_exactly_what_base_plus_adapter_does(
    trained_adapter, tiny_model_path, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatmusician.model.loading import load_model, load_tokenizer

    merged_dir = merge_adapter(trained_adapter, tmp_path / "merged")
    tokenizer = load_tokenizer(str(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with_adapter = PeftModel.from_pretrained(load_model(tiny_model_path), str(trained_adapter)).eval()
    base = load_model(tiny_model_path).eval()

    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    expected = _greedy(with_adapter, tokenizer)
    assert _greedy(merged, tokenizer) == expected
    assert _greedy(base, tokenizer) != expected  # the adapter matters, so the equality above means something
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)


def test_merge_cli_and_bad_adapter_folder(trained_adapter, tmp_path, capsys):
    from chatmusician.cli import main

    assert main(["merge", "--adapter", str(trained_adapter), "--out_dir", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    with pytest.raises(MergeError, match="not a PEFT adapter"):
        merge_adapter(tmp_path / "nothing-here", tmp_path / "out")
    capsys.readouterr()
    assert main(["merge", "--out_dir", str(tmp_path / "x")]) == 2  # one line on stderr, no traceback
    err = capsys.readouterr().err
    assert "adapter is required" in err and "Traceback" not in err
