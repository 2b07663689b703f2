"""Typed configs of the evaluation workflow (``chatmusician eval``): MusicTheoryBench, MMLU, ABC quality.

Dataclasses only (no torch/ray imports) so that ``--help`` stays fast. ``configs/eval.yaml`` is the paper's
setting on the real model; the defaults here read the fixtures shipped in ``chatmusician/eval/fixtures``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
MTB_FIXTURE = str(FIXTURES / "mtb")
MMLU_FIXTURE = str(FIXTURES / "mmlu")
MMLU_CSV_FIXTURE = str(FIXTURES / "mmlu_csv")
PAPER_FIGURES = str(Path(__file__).parent / "paper_figures.yaml")
MTB_MODES = ("ppl_zero_shot", "ppl_few_shot", "gen_zero_shot", "gen_few_shot")


@dataclass
class MTBConfig:
    """MusicTheoryBench: 4-option questions scored by perplexity (the paper's numbers) or by generation."""

    enabled: bool = True
    """Run MusicTheoryBench."""
    path: str = MTB_FIXTURE
    """Hub id (m-a-p/MusicTheoryBench) or a local folder / file of parquet, json or jsonl with dev and test splits."""
    modes: list[str] = field(default_factory=lambda: ["ppl_zero_shot", "ppl_few_shot"])
    """Any of ppl_zero_shot, ppl_few_shot (OpenCompass PPL, the paper's protocol), gen_zero_shot, gen_few_shot."""
    subjects: list[str] = field(default_factory=lambda: ["knowledge", "reasoning"])
    """Subjects of the test split to evaluate (the original ran each as its own dataset)."""
    limit: int | None = None
    """Evaluate only the first N test questions (smoke runs)."""
    shuffles: int = 0
    """Seeded option shuffles averaged (the paper's 5, §4.3), reported beside the original order, which is always
    scored (what the released OpenCompass configs score)."""
    shots: int = 5
    """Few-shot modes: the first N dev rows (OpenCompass's ``FixKRetriever(fix_id_list=[0..4])``)."""
    safe_format: bool = True
    """Fill templates as OpenCompass does (``str.replace`` of every ``{column}``, also inside inserted text, so
    ABC grace notes ``{A}`` become option texts, as in the original's prompts); false: each field once."""
    seed: int = 0
    """Seed of the option shuffles, the bootstrap and generation sampling."""
    one_pass: bool = True
    """Score the four candidates with one forward pass over their shared prefix where tokenization allows."""
    max_seq_len: int = 2048
    """The model config's max_seq_len (OpenCompass; MMLU too): shots dropped from the end until the prompt fits, then
    tokens cut."""
    ci_level: float = 0.95
    """Confidence level of the bootstrap interval over questions."""
    bootstrap: int = 2000
    """Bootstrap resamples for the confidence interval."""
    gen_max_new_tokens: int = 32
    """Generation mode: tokens generated per answer."""
    gen_temperature: float = 0.0
    """Generation mode: 0 = greedy (reproducible); above 0 samples with the DESIGN defaults of top_p/top_k."""


@dataclass
class MMLUConfig:
    """MMLU as the paper scored it (OpenCompass's ``mmlu_ppl_ac766d``: 5 fixed shots, whole-sequence PPL), with
    lm-evaluation-harness as an optional, labelled cross-check."""

    enabled: bool = False
    """Run MMLU."""
    path: str = MMLU_FIXTURE
    """Hendrycks' CSV folder ({dev,test}/<subject>_<split>.csv), hub id cais/mmlu, or local files in its schema."""
    num_fewshot: int = 5
    """Shots: the subject's first N dev rows (OpenCompass's fix_id_list=[0..4]; lm-eval's first_n)."""
    limit: int | None = None
    """At most N test questions per subject."""
    safe_format: bool = True
    """Fill templates with OpenCompass's safe_format (see mtb.safe_format)."""
    lm_eval: bool = False
    """Also run lm-eval's MMLU (answer-only log-likelihood, no BOS, left truncation): reported apart, labelled."""
    batch_size: int = 8
    """lm-eval's batch size for loglikelihood requests."""
    lm_eval_mtb: bool = False
    """With lm_eval: also run the shipped lm-eval task definition of MusicTheoryBench."""


@dataclass
class AbcQualityConfig:
    """Quality of generated ABC: parse success, key/meter as requested, bar consistency, repeats, structure."""

    enabled: bool = False
    """Run the ABC quality evaluation."""
    prompts: str | None = None
    """JSON/JSONL file of {family, fields, request} prompts; default: the shipped set covering every task family."""
    n_per_prompt: int = 2
    """Tunes generated per prompt."""
    max_new_tokens: int = 256
    """Tokens generated per tune (the original allowed 1536)."""
    temperature: float = 0.2
    """Sampling temperature (the original's default)."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    top_k: int = 40
    """Top-k sampling."""
    repetition_penalty: float = 1.1
    """Repetition penalty (the original's default)."""
    constrained: bool = False
    """Generate through the ABC grammar (chatmusician.model.constrained) instead of free sampling."""
    check_midi: bool = True
    """Parse success also needs abc2midi (sandboxed) to write a usable MIDI file."""
    distinct_n: int = 4
    """Diversity: n of the distinct-n over each prompt's samples (music tokens)."""
    train_tunes: str | None = None
    """Memorisation: the training tunes (ABC file or folder, or JSONL with a text field); none: not checked."""


@dataclass
class PoolConfig:
    """The pool of model replicas (Ray Data actors) that stream the evaluation work through."""

    replicas: int = 1
    """Model replicas (actors), each holding the whole model."""
    num_cpus: float = 1.0
    """CPUs each replica reserves."""
    num_gpus: float = 0.0
    """GPUs each replica reserves (1 per replica for a 7B model)."""
    batch_size: int = 8
    """Work items per batch handed to a replica."""
    torch_threads: int | None = None
    """torch intra-op threads per replica; default: the replica's CPUs rounded up."""
    use_ray: bool = True
    """False: a single-process loop in the driver (same code, no Ray), the benchmark's baseline."""


@dataclass
class EvalConfig:
    """Evaluate a model on MusicTheoryBench (PPL + generation), MMLU (OpenCompass PPL) and ABC quality, as Ray Data
    batch inference; writes results.json, results.md, per-subject bar charts and a reproducibility record."""

    model: str = "m-a-p/ChatMusician"
    """Model to evaluate: hub id or local path."""
    models: str | None = None
    """Several models, comma-separated: each evaluated into output_dir/<n>-<name>, then comparison.md/.csv."""
    compare: str | None = None
    """Earlier results folders, comma-separated, put in comparison.md/.csv beside this run."""
    paper_figures: str | None = PAPER_FIGURES
    """YAML of the paper's figures per model id, shown beside this run's in results.md (none: not shown)."""
    tokenizer: str | None = None
    """Tokenizer hub id or path; default: the model's."""
    adapter: str | None = None
    """Optional PEFT adapter folder applied on top of the model (merged at load time)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    device: str = "auto"
    """cpu, cuda or auto."""
    output_dir: str = "./outputs/eval"
    """Where results.json, results.md, the PNG charts, config.yaml and fingerprint.json go."""
    mtb: MTBConfig = field(default_factory=MTBConfig)
    """MusicTheoryBench settings."""
    mmlu: MMLUConfig = field(default_factory=MMLUConfig)
    """MMLU settings."""
    abc_quality: AbcQualityConfig = field(default_factory=AbcQualityConfig)
    """ABC quality settings."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Model replica pool."""
