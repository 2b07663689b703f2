"""Typed configs of the training workflows (``chatmusician pretrain | sft | merge``).

Dataclasses only (no torch/ray imports) so that ``--help`` stays fast. ``configs/pretrain.yaml`` and
``configs/sft.yaml`` carry the original ChatMusician's defaults; ``configs/train_tiny.yaml`` is the CPU run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from chatmusician.data.config import TokenizeConfig

REPORTERS = ("tensorboard", "mlflow", "wandb")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


class TrainConfigError(ValueError):
    """A train config that cannot run, found before any worker starts."""


@dataclass
class LoraConfig:
    """LoRA adapter settings (peft); the defaults are the original's."""

    r: int = 64
    """Rank of the low-rank update."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.1
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers that get an adapter."""
    modules_to_save: list[str] = field(default_factory=lambda: ["embed_tokens", "lm_head"])
    """Modules trained in full and saved with the adapter (the paper trains embeddings and lm_head)."""


@dataclass
class DataConfig:
    """Where the tokenized rows come from: materialized shards or the live Ray Data stream."""

    shards: str | None = None
    """Folder of parquet shards + manifest.json written by the data stage (``read_shards``)."""
    stream: TokenizeConfig | None = None
    """Tokenize on the fly with the data stage's ``build_dataset`` (used when shards is not set; read in the stream's order, no shuffle)."""
    shuffle: bool = True
    """Shards: a seeded shuffle, different every epoch (chunk order + windows; chatmusician.train.data_order)."""
    shuffle_window: int = 1024
    """Shards: rows each worker shuffles together (one window is held in memory)."""
    val_shards: str | None = None
    """Validation shards (a folder with manifest.json); default: ``<shards>/val`` when the data stage wrote one (TokenizeConfig.val_fraction)."""


@dataclass
class TrainConfig:
    """Continual pretraining or SFT with Ray Train + DeepSpeed ZeRO + LoRA (one recipe: chatmusician.train.recipe)."""

    run_name: str = "chatmusician"
    """Name of the run under storage_path; re-running the same name resumes from its last checkpoint."""
    storage_path: str = "./runs"
    """Where checkpoints and TensorBoard logs go: a local/NFS folder or a URI such as s3://bucket/prefix."""
    model: str = "m-a-p/ChatMusician-Base"
    """Base model: hub id or local path (loaded in the profile's precision)."""
    train_type: str = "lora"
    """``lora`` (peft adapter + modules_to_save) or ``full`` (every weight trained)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings (used when train_type is lora)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data source."""
    profile: str = "a800"
    """Hardware profile: a800 (bf16), v100 (fp16 + dynamic loss scaling), cpu (fp32, gloo)."""
    zero_stage: int | None = None
    """DeepSpeed ZeRO stage 0-3; default: the profile's."""
    num_workers: int = 8
    """Number of Ray Train workers (one per GPU)."""
    cpus_per_worker: float | None = None
    """CPUs each worker requests; default: the profile's."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker requests (custom node resources, e.g. {"trainer_slot": 1})."""
    accelerator_type: str | None = None
    """Ray accelerator type the workers request (A800, V100, ...); default: the profile's; empty string: any."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all workers (micro batch x workers x accumulation)."""
    micro_batch_size: int = 1
    """Sequences per worker per forward pass; gradient accumulation fills the rest of the global batch."""
    max_length: int = 2048
    """Longest sequence fed to the model (shards written with a longer max_len are refused)."""
    attn_implementation: str = "auto"
    """Attention kernel: auto (flash_attention_2 on bf16 GPUs where flash-attn is installed: varlen over packed rows' position_ids, no dense mask; sdpa otherwise), sdpa, eager or flash_attention_2."""
    max_steps: int | None = None
    """Optimizer steps of the whole run; default: epochs x rows / global batch."""
    epochs: int = 1
    """Passes over the data (used when max_steps is not set)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent in linear warmup before the cosine decay."""
    grad_clip: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    seed: int = 42
    """Seed of weight init (LoRA), of dropout and of the data shuffle."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_last: int = 3
    """How many checkpoints to keep."""
    async_checkpoint_upload: bool = True
    """Upload each checkpoint to storage in the background while training goes on (Ray Train's ASYNC mode)."""
    max_failures: int = 3
    """How many worker failures the run survives by restarting from the last checkpoint."""
    log_every: int = 10
    """Report metrics to Ray Train every this many steps (TensorBoard and metrics.jsonl get every step)."""
    eval_every: int | None = None
    """Evaluate the validation split every this many optimizer steps (and always at the end); None: at the end only."""
    eval_max_batches: int | None = None
    """Validate on at most this many batches of micro_batch_size rows (the split's first rows, the same for any world size); None: the whole split."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers rank 0 logs params and per-step metrics to: tensorboard, mlflow, wandb (metrics.jsonl always)."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's own default)."""
    experiment: str | None = None
    """MLflow experiment / W&B project name (default: the run name's config class, e.g. sft)."""
    placement_wait_s: float = 0.0
    """Seconds to wait for nodes that can hold the workers to join (an autoscaling cluster) before refusing the run."""
    eval_hook: str | None = None
    """Dotted path ``module:function`` called on rank 0 at each eval step as ``fn(model, tokenizer, step) -> dict[str, float]``; the metrics are merged into the report, TensorBoard and metrics.jsonl (model: the trained peft/HF module in eval mode, under ZeRO-3 a rank-0 copy consolidated layer by layer, never a full gather on every rank; tokenizer: the base model's)."""
    fail_at_step: int | None = None
    """Testing hook: the last rank kills its process as step N starts (before any collective of it), once per run (a marker file)."""


@dataclass
class PretrainConfig(TrainConfig):
    """Continual pretraining on MusicPile (A800 nodes, bf16, ZeRO-2, LoRA) with Ray Train + DeepSpeed."""

    MODE: ClassVar[str] = "pt"  # the shards' tokenize mode this run trains on (checked against the manifest)

    run_name: str = "pretrain"
    """Name of the run under storage_path; re-running the same name resumes from its last checkpoint."""
    profile: str = "a800"
    """Hardware profile: a800 (bf16), v100 (fp16 + dynamic loss scaling), cpu (fp32, gloo)."""


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on MusicPile-sft (V100 nodes, fp16, ZeRO-2, LoRA) with Ray Train + DeepSpeed."""

    MODE: ClassVar[str] = "sft"

    run_name: str = "sft"
    """Name of the run under storage_path; re-running the same name resumes from its last checkpoint."""
    profile: str = "v100"
    """Hardware profile: a800 (bf16), v100 (fp16 + dynamic loss scaling), cpu (fp32, gloo)."""


@dataclass
class MergeConfig:
    """Merge a trained LoRA adapter into its base model and save a plain Hugging Face model."""

    adapter: str = ""
    """Folder of the PEFT adapter (adapter_config.json + adapter_model.safetensors), e.g. a checkpoint's adapter/."""
    out_dir: str = "./outputs/merged"
    """Where to write the merged model and tokenizer."""
    base_model: str | None = None
    """Base model hub id or path; default: the one recorded in the adapter's config."""
    precision: str = "fp32"
    """Precision to merge and save in: fp32, bf16 or fp16."""


@dataclass
class PlanConfig(TrainConfig):
    """What a pretrain/sft run will cost before it starts (memory per GPU, steps, checkpoint size, wall time)
    and whether it fits: the same config file and flags as ``chatmusician pretrain | sft``, plus the fields below."""

    model_config: str | None = None
    """A config.json (or a folder holding one) to plan from instead of the model's own; no weights are read."""
    mfu: float = 0.40
    """Model FLOPs utilisation the wall times assume (the trainer logs a run's own as ``mfu``)."""
    margin: float = 0.10
    """Fraction of each GPU's memory kept free for the CUDA context, NCCL buffers and allocator fragmentation."""
    compare: bool = True
    """Also plan the same run on the other GPU profiles, side by side (the exit status follows ``profile`` only)."""
    json: bool = False
    """Print the plans as JSON instead of a table."""
    preference: bool = False
    """Plan a preference run (chatmusician dpo): each row a chosen/rejected pair, and LoRA's reference pass."""


DPO_LOSSES = ("sigmoid", "dpop", "ipo")


@dataclass
class DPOConfig(TrainConfig):
    """Preference training on ``prompt``/``chosen``/``rejected`` pairs (``chatmusician prefs`` writes them) with
    the same Ray Train + DeepSpeed + LoRA recipe: DPO (sigmoid), DPO-Positive (dpop, NotaGen's) or IPO."""

    MODE: ClassVar[str] = "dpo"
    PREFERENCE: ClassVar[bool] = True  # rows are chosen/rejected pairs (the planner: two sequences per row)
    VAL_MODE: ClassVar[str | None] = None  # validation perplexity on any tokenized split (the SFT one)

    run_name: str = "dpo"
    """Name of the run under storage_path; re-running the same name resumes from its last checkpoint."""
    profile: str = "v100"
    """Hardware profile: a800 (bf16), v100 (fp16 + dynamic loss scaling), cpu (fp32, gloo)."""
    pairs: str = "./outputs/prefs"
    """The pairs: a ``chatmusician prefs`` folder (its pairs.parquet) or a parquet file with prompt, chosen, rejected."""
    loss: str = "dpop"
    """sigmoid (DPO, Rafailov et al. 2023), dpop (DPO-Positive, Pal et al. 2024; NotaGen's) or ipo (Azar et al. 2023, TRL's per-token form)."""
    beta: float = 0.1
    """Strength of the pull to the reference (DPO's beta; IPO's tau). NotaGen: 0.1."""
    dpop_lambda: float = 10.0
    """DPO-Positive's lambda: weight of max(0, ref_chosen_logp - policy_chosen_logp) inside the sigmoid. NotaGen: 10."""
    sft_weight: float = 0.0
    """Weight of the chosen answers' NLL per token added to the loss (RPO; TRL's loss_type [..., "sft"]): 0 = off."""
    max_prompt_length: int = 1536
    """Prompt tokens kept (the rest of max_length goes to the answer), as the SFT layout."""
    lr: float = 5e-5
    """Peak learning rate of AdamW (lower than SFT's: preference steps move a trained model)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent in linear warmup before the cosine decay."""
