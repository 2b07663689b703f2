"""Measure the peak memory of real fp32 training steps of tiny LLaMAs on CPU, for tests/test_train_plan.py.

Each case builds a ``LlamaForCausalLM`` (sdpa attention; peft LoRA when asked), takes one AdamW step (so the
moments exist), then resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` 5) and takes a second step
with the gradients kept, as ZeRO's gradient buffers keep them. The peak of that step over the RSS before the
model was built is the measured memory. glibc serves every allocation of 64 KiB or more by mmap (environment
set by the test), so freed tensors leave the RSS at once and the peak is the peak of live tensors.

    python tests/plan_memory_probe.py CASES.json  ->  one JSON line per case: {"measured": bytes}
"""

from __future__ import annotations

import gc
import json
import sys


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def step(model, optimizer, batch) -> None:
    loss = model(input_ids=batch, labels=batch).loss  # the trainer's call: HF's own loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def measure(case: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    batch = torch.randint(0, case["config"]["vocab_size"], (case["batch"], case["seq"]))
    gc.collect()
    before = rss("VmRSS")
    model = LlamaForCausalLM(LlamaConfig(**case["config"], attn_implementation="sdpa"))
    model.config.use_cache = False
    if case["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case["train_type"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = case["lora"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                target_modules=lora["target_modules"],
                modules_to_save=lora["modules_to_save"],
                task_type="CAUSAL_LM",
            ),
        )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step(model, optimizer, batch)  # creates Adam's m and v and the gradients
    gc.collect()
    reset_peak()
    step(model, optimizer, batch)
    measured = rss("VmHWM") - before
    del model, optimizer
    gc.collect()
    return measured


def main(path: str) -> None:
    import torch

    torch.set_num_threads(1)  # no per-thread scratch buffers; the host is shared
    cases = json.loads(open(path).read())
    warm = dict(cases[0], batch=1, seq=8)
    measure(warm)  # loads kernels and libraries lazily touched by the first step
    for case in cases:
        print(json.dumps({"measured": measure(case)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
