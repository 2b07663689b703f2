"""Run by tests/test_serve_vllm_units.py in the vLLM environment: the meter logits processor's own bookkeeping,
without an engine (vLLM's BatchUpdate as the model runner hands it over); prints one JSON line of findings."""

import json
import sys
from types import SimpleNamespace

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from chatmusician.model.loading import load_tokenizer
from chatmusician.serve.engines.vllm_meter import METER_KEY, MeterLogitsProcessor


def main(model: str) -> dict:
    tokenizer = load_tokenizer(model)
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=model))
    processor = MeterLogitsProcessor(config, torch.device("cpu"), False)
    meter, plain = SamplingParams(extra_args={METER_KEY: True}), SamplingParams()
    ids = tokenizer("X:1\nM:2/4\nL:1/8\nK:G\nGABc|de", add_special_tokens=False)["input_ids"]
    bar = tokenizer.convert_tokens_to_ids("|")
    width = len(tokenizer) + 8  # the model's padded vocabulary

    def logits() -> torch.Tensor:
        out = torch.zeros((2, width))
        out[:, bar] = 5.0  # the best token closes a bar two eighths short
        return out

    found: dict = {"validate": None}
    try:
        MeterLogitsProcessor.validate_params(SamplingParams(extra_args={METER_KEY: "yes"}))
    except ValueError as error:
        found["validate"] = str(error)
    out_meter, out_plain = list(ids), list(ids)
    processor.update_state(BatchUpdate(2, [], [(0, meter, [1], out_meter), (1, plain, [1], out_plain)], []))
    found["rows_after_add"] = sorted(processor.rows)
    first = processor.apply(logits())
    found["bar_masked"] = [bool(first[r, bar] == float("-inf")) for r in range(2)]
    found["padded_masked"] = [bool(torch.isinf(first[r, len(tokenizer) :]).all()) for r in range(2)]
    found["plain_untouched"] = bool(torch.equal(first[1], logits()[1]))
    processor.update_state(BatchUpdate(2, [], [], [(0, 1, MoveDirectionality.SWAP)]))
    found["rows_after_swap"] = sorted(processor.rows)
    out_meter += tokenizer("B", add_special_tokens=False)["input_ids"][-1:] + [-1]  # a placeholder
    swapped = processor.apply(logits())
    found["bar_masked_after_swap"] = [bool(swapped[r, bar] == float("-inf")) for r in range(2)]
    processor.update_state(BatchUpdate(1, [1], [], []))
    found["rows_after_remove"] = sorted(processor.rows)
    return found


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
