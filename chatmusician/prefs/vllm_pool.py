"""The prefs job's vLLM sampler: a Ray actor that runs in the vLLM environment (``.venv-vllm``, through the
serving engine's runtime_env) and answers the evaluation's ``abc`` work items like its ``Replica`` does: the chat
template without BOS, the pad token never sampled, each item from its own seed (vLLM's per-request generator,
so an answer does not depend on its batch; the draws differ from the transformers pool's). Importable without
vLLM; unconstrained sampling only, on a merged model (no adapter)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from chatmusician.prefs.config import PrefsConfig

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check(cfg: PrefsConfig) -> None:
    if cfg.engine not in ("transformers", "vllm"):
        raise ValueError(f"engine must be transformers or vllm, got {cfg.engine!r}")
    if cfg.engine == "vllm" and not cfg.pool.use_ray:
        raise ValueError("engine vllm runs in Ray actors of the vLLM environment: set pool.use_ray true")
    if cfg.engine == "vllm" and (
        cfg.adapter or cfg.constrained or cfg.chosen_constrained or cfg.chosen_header
    ):
        raise ValueError("engine vllm samples a merged model without the ABC grammar: merge the adapter first "
                         "(chatmusician merge) and set constrained, chosen_constrained and chosen_header false, or use engine transformers")  # fmt: skip


def sampling(cfg: PrefsConfig) -> dict[str, Any]:
    """vLLM ``SamplingParams`` arguments shared by every item (the seed is per item)."""
    return {"n": 1, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p if cfg.temperature > 0 else 1.0, "top_k": cfg.top_k if cfg.top_k > 0 else -1,
            "repetition_penalty": cfg.repetition_penalty, "skip_special_tokens": True}  # fmt: skip


class VllmSampler:
    """Ray actor: one in-process vLLM engine; batches of ``abc`` work items in, results out."""

    def __init__(self, cfg: PrefsConfig):
        from vllm import LLM

        self.llm = LLM(model=cfg.model, tokenizer=cfg.tokenizer or cfg.model, dtype=DTYPES[cfg.precision],
                       max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens, enforce_eager=True, seed=0,
                       disable_log_stats=True, enable_prefix_caching=False)  # fmt: skip
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = sampling(cfg)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        if pad is not None and pad != eos:
            self.sampling["logit_bias"] = {int(pad): -100.0}  # LLaMA pads with <unk>: never in an answer

    def answer(self, batch: Mapping[str, Any]) -> dict[str, list]:
        from vllm import SamplingParams

        from chatmusician.prompts import build_chat_prompt

        payloads = [json.loads(p) for p in batch["payload"]]
        prompts = [
            {
                "prompt_token_ids": self.tokenizer(build_chat_prompt(p["prompt"]), add_special_tokens=False)[
                    "input_ids"
                ]
            }
            for p in payloads
        ]  # the template has no BOS, as the transformers pool
        params = [SamplingParams(**self.sampling, seed=int(p["seed"])) for p in payloads]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = [
            json.dumps({"text": o.outputs[0].text, "tokens": len(o.outputs[0].token_ids)}) for o in outs
        ]
        return {"key": list(batch["key"]), "kind": list(batch["kind"]), "result": results}


def run(cfg: PrefsConfig, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items through ``pool.replicas`` vLLM actors (Ray must be up), batches handed out in turn. Plain Ray
    actors, not Ray Data: the vLLM environment has no pandas, which Ray Data's workers import."""
    import ray

    from chatmusician.serve.app import vllm_python
    from chatmusician.serve.engines.vllm_env import runtime_env

    env = runtime_env(vllm_python(cfg.vllm_python), cfg.vllm_kv_cache_gib)
    actor = ray.remote(num_cpus=cfg.pool.num_cpus, num_gpus=cfg.pool.num_gpus, runtime_env=env)(VllmSampler)
    actors = [actor.remote(cfg) for _ in range(cfg.pool.replicas)]
    size = cfg.pool.batch_size
    batches = [{k: [r[k] for r in items[i : i + size]] for k in ("key", "kind", "payload")}
               for i in range(0, len(items), size)]  # fmt: skip
    try:
        outs = ray.get([actors[i % len(actors)].answer.remote(b) for i, b in enumerate(batches)])
    finally:
        for a in actors:
            ray.kill(a)
    return [{k: out[k][i] for k in ("key", "kind", "result")} for out in outs for i in range(len(out["key"]))]
