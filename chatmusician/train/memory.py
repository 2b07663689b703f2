"""The memory model of a training run, per GPU, from a Hugging Face ``config.json`` alone (no weights).

Pure arithmetic on the shapes of a LLaMA-architecture model, in three parts:

* model states - DeepSpeed's ZeRO estimators (``deepspeed.runtime.zero.stage_1_and_2.
  estimate_zero2_model_states_mem_needs``, ``stage3.estimate_zero3_model_states_mem_needs``) count every
  parameter as trainable; here frozen weights (LoRA's base) cost only their working-precision copy, and only
  trainable ones get gradients, fp32 master weights, fp32 gradients and Adam's two moments;
* DeepSpeed's gradient buckets (ZeRO-1/2 allocate ``reduce_bucket_size`` elements, twice with overlap_comm);
* activations of one micro batch, counted tensor by tensor for HF's LLaMA decoder layer the way Korthikanti
  et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1: 34·sbh + 5·as²b bytes
  per GPT layer in 16 bit) count a GPT layer; see :func:`layer_activation_bytes`.

tests/test_train_plan.py measures it against the peak of real fp32 training steps on CPU (docs/planning.md: the error).
:mod:`chatmusician.train.plan` turns it into a plan and a refusal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
REDUCE_BUCKET_SIZE = int(5e8)
"""DeepSpeed's default ``zero_optimization.reduce_bucket_size`` (deepspeed/runtime/zero/config.py)."""
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class PlanError(ValueError):
    """A model or config the planner cannot read or model (not a LLaMA-architecture config.json, ...)."""


@dataclass(frozen=True)
class Architecture:
    """The shapes of a LLaMA-architecture causal LM, as its ``config.json`` gives them."""

    vocab_size: int
    """Rows of the embedding and of lm_head."""
    hidden_size: int
    """Width of the residual stream (h)."""
    intermediate_size: int
    """Width of the SwiGLU MLP (I)."""
    num_layers: int
    """Decoder layers (L)."""
    num_heads: int
    """Query heads (a)."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    head_dim: int
    """Width of one head."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding's weight."""
    attention_bias: bool = False
    """q/k/v/o projections have biases."""
    mlp_bias: bool = False
    """gate/up/down projections have biases."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        needed = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in needed if k not in config]
        if missing or config.get("model_type", "llama") not in ("llama", "mistral"):
            raise PlanError(
                f"the planner models LLaMA-architecture configs; this config.json has model_type "
                f"{config.get('model_type')!r}{' and lacks ' + ', '.join(missing) if missing else ''}"
            )
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Each decoder layer's projections: name -> (in features, out features, has bias)."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        ab, mb = self.attention_bias, self.mlp_bias
        return {
            "q_proj": (h, q, ab),
            "k_proj": (h, kv, ab),
            "v_proj": (h, kv, ab),
            "o_proj": (q, h, ab),
            "gate_proj": (h, i, mb),
            "up_proj": (h, i, mb),
            "down_proj": (i, h, mb),
        }


@dataclass(frozen=True)
class ParamCount:
    """Parameters of the model as it trains (LoRA: the base plus adapters and modules_to_save copies)."""

    base: int
    """Parameters of the base model (what ``config.json`` describes)."""
    frozen: int
    """Parameters that get no gradient (LoRA: the whole base, incl. the originals behind modules_to_save)."""
    trainable: int
    """Parameters the optimizer updates (LoRA: A/B matrices + modules_to_save copies)."""
    compute: int
    """Parameters a forward pass multiplies by (a modules_to_save original is skipped: its copy is used)."""
    largest_module: int
    """Most parameters held by one module (ZeRO-3 gathers one at a time: DeepSpeed's largest_layer_params)."""


def count_parameters(arch: Architecture, train_type: str = "lora", lora: Any = None) -> ParamCount:
    """Parameter counts from the shapes alone; ``lora`` is a :class:`chatmusician.train.config.LoraConfig`."""
    h, v, layers = arch.hidden_size, arch.vocab_size, arch.num_layers
    per_layer = sum(i * o + (o if b else 0) for i, o, b in arch.linears().values()) + 2 * h  # + 2 RMSNorms
    heads = {"embed_tokens": v * h, "lm_head": 0 if arch.tie_word_embeddings else v * h}
    base = layers * per_layer + sum(heads.values()) + h  # + the final norm
    largest = max(v * h, *(i * o for i, o, _ in arch.linears().values()))
    if train_type == "full":
        return ParamCount(base, 0, base, base, largest)
    if train_type != "lora":
        raise PlanError(f"train_type must be lora or full, got {train_type!r}")
    linears = arch.linears()
    unknown = sorted(set(lora.target_modules) - set(linears) - set(heads))
    unknown += sorted(set(lora.modules_to_save) - set(heads))
    if unknown:
        raise PlanError(f"the planner knows no LLaMA module named {unknown}; use {sorted(linears | heads)}")
    shapes = {**{k: (i, o) for k, (i, o, _) in linears.items()}, "lm_head": (h, v), "embed_tokens": (v, h)}
    # LoRA on a Linear(in, out): A is r x in, B is out x r; per decoder layer, and once for a head module.
    adapters = sum(lora.r * sum(shapes[t]) * (layers if t in linears else 1) for t in lora.target_modules)
    # peft's modules_to_save wrapper keeps the frozen original AND a trainable copy of the module.
    copies = sum(v * h for _ in lora.modules_to_save)  # embed_tokens and lm_head are both V x h
    return ParamCount(base, base, adapters + copies, base + adapters, largest)


# ---------------------------------------------------------------- memory per GPU


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of what the model and its optimizer keep for the whole run."""

    weights: int
    """Every weight in the working precision (ZeRO-3: this rank's 1/N share, plus one gathered module)."""
    gradients: int
    """Working-precision gradients of the trainable weights (ZeRO-2/3: this rank's share)."""
    optimizer: int
    """fp32 master weights + fp32 gradients + Adam's m and v of the trainable weights (ZeRO-1+: a share)."""
    buckets: int
    """DeepSpeed's gradient reduce buckets (ZeRO-1/2 with contiguous_gradients)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buckets


def model_state_bytes(
    params: ParamCount,
    stage: int,
    world_size: int,
    precision: str,
    bucket_buffers: int = 0,
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE,
) -> ModelStates:
    """DeepSpeed's ZeRO model-state estimates, split into frozen and trainable parameters.

    DeepSpeed 0.19 (all of Ψ params trainable, fp16/bf16, no offload, N GPUs):
      ZeRO-2: ``2Ψ + 18Ψ/N`` - "2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit +
      8_optimizer_states_32bit" (estimate_zero2_model_states_mem_needs);
      ZeRO-3: ``4·largest_layer + 18Ψ/N`` (estimate_zero3_model_states_mem_needs); here ``+ 2Ψ/N`` more: the
      16-bit gradient partition (stage3's ``grad_partitions_flat_buffer``) that its 18 leaves out.
    It has no estimator for stages 0/1; the same terms, unpartitioned, follow the ZeRO paper (Rajbhandari et
    al. 2020, section 5: P_os partitions only the optimizer states). Frozen parameters keep only their weights.
    fp32 training keeps a separate fp32 master copy too (ZeRO clones the partition), except at stage 0,
    where DeepSpeed hands torch's AdamW the parameters themselves (m and v only: 8 bytes).
    """
    if stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage must be 0-3, got {stage}")
    w = WEIGHT_BYTES[precision]
    n = world_size
    trainable, every = params.trainable, params.frozen + params.trainable
    states = 8 if precision == "fp32" and stage == 0 else 16  # Adam m, v (+ fp32 master and fp32 grads)
    if stage == 3:
        # DeepSpeed's 4·largest_layer: one gathered module's 16-bit weights and gradients.
        weights = math.ceil(w * every / n) + 2 * w * params.largest_module
    else:
        weights = w * every
    gradients = w * trainable if stage < 2 else math.ceil(w * trainable / n)
    optimizer = states * trainable if stage == 0 else math.ceil(states * trainable / n)
    buckets = w * reduce_bucket_size * bucket_buffers if stage in (1, 2) else 0
    return ModelStates(weights, gradients, optimizer, buckets)


def layer_activation_bytes(
    arch: Architecture, precision: str, train_type: str, lora: Any = None, gpu: bool = True
) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token, as HF's LlamaDecoderLayer with sdpa
    saves them. Korthikanti et al.'s method (count what each op saves), on LLaMA instead of GPT:

    * RMSNorm (x2) upcasts its input to fp32 and keeps it (4h); its normalized output only when its weight
      trains (w·h); no dropout in LLaMA;
    * attention: memory-efficient/flash sdpa keeps q, k, v, its output and an fp32 log-sum-exp per head
      (w·(2·q + 2·kv) + 4a), not the a·s² scores of eager attention (Korthikanti's 5as/h term);
    * SwiGLU MLP: the gate output, its SiLU and the up output (3w·I);
    * the input of every projection whose weight trains (full: w·(2h + q + I), each input once), or, for
      LoRA, per adapted projection its dropout mask (1 byte on GPU; CPU dropout keeps a w-byte noise tensor),
      the dropped input that lora_A keeps (w·in) and lora_A's output (w·r). Frozen projections keep nothing.
    """
    w = WEIGHT_BYTES[precision]
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    full = train_type == "full"
    norms = 2 * (4 * h + (w * h if full else 0))
    attention = w * (2 * q + 2 * kv) + 4 * arch.num_heads
    mlp = 3 * w * i
    if full:
        inputs = w * (2 * h + q + i)
    else:
        linears = arch.linears()
        targets = [t for t in lora.target_modules if t in linears]
        if lora.dropout > 0:
            mask = 1 if gpu else w
            inputs = sum((w + mask) * linears[t][0] + w * lora.r for t in targets)
        else:  # no dropout: lora_A keeps the projection's input itself, shared by q/k/v and by gate/up
            distinct = {_input_of(t, linears) for t in targets}
            inputs = w * sum(width for _, width in distinct) + w * lora.r * len(targets)
    return norms + attention + mlp + inputs


def _input_of(name: str, linears: dict[str, tuple[int, int, bool]]) -> tuple[str, int]:
    """Which tensor feeds a projection (q/k/v share one, gate/up another) and its width."""
    group = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
    return group.get(name, name), linears[name][0]


def head_activation_bytes(arch: Architecture, precision: str, train_type: str, lora: Any = None) -> int:
    """Bytes per token around the last layer at the start of the backward pass: the final norm (as above),
    lm_head's input when lm_head trains, and the loss: HF upcasts the logits to fp32, cross entropy keeps its
    fp32 log-probabilities (4V), and the first backward steps hold two fp32 V-wide gradients (8V) plus, in
    16 bit, the logits' own gradient (w·V)."""
    w = WEIGHT_BYTES[precision]
    h, v = arch.hidden_size, arch.vocab_size
    full = train_type == "full"
    head_trains = full or "lm_head" in lora.modules_to_save or "lm_head" in lora.target_modules
    norm = 4 * h + (w * h if full else 0)
    return norm + (w * h if head_trains else 0) + 12 * v + (w * v if w < 4 else 0)


def activation_bytes(
    arch: Architecture,
    precision: str,
    train_type: str,
    lora: Any,
    micro_batch_size: int,
    seq_len: int,
    checkpointing: bool,
    gpu: bool = True,
) -> int:
    """Peak activation bytes of one micro batch. Without checkpointing every layer keeps its tensors; with it
    (HF, non-reentrant) each layer keeps only its input (w·h per token: Korthikanti's 2sbh "full
    recomputation") and one layer's tensors live again while it is recomputed. Packed rows add HF's
    block-diagonal boolean mask, b·s² bytes, shared by all layers."""
    w = WEIGHT_BYTES[precision]
    tokens = micro_batch_size * seq_len
    layer = layer_activation_bytes(arch, precision, train_type, lora, gpu)
    head = head_activation_bytes(arch, precision, train_type, lora)
    if checkpointing:
        per_token = arch.num_layers * w * arch.hidden_size + max(head, layer)
    else:
        per_token = arch.num_layers * layer + head
    return tokens * per_token + micro_batch_size * seq_len**2


def checkpoint_bytes(params: ParamCount, precision: str, stage: int) -> int:
    """One checkpoint on storage: DeepSpeed's state of what trains (16-bit weights, fp32 master + Adam m and v,
    summed over the ranks' shards; the frozen base is never saved) plus rank 0's safetensors export."""
    w = WEIGHT_BYTES[precision]
    optimizer = 8 if precision == "fp32" and stage == 0 else 12
    return params.trainable * (w + optimizer + w)
