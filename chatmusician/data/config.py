"""Config of the data stage (``chatmusician tokenize``): sources, mode, lengths, packing, output. No torch/ray here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pt", "sft"]
Packing = Literal["none", "greedy"]
Format = Literal["auto", "hub", "parquet", "jsonl", "json", "abc"]


@dataclass
class SourceConfig:
    """One input of the mixture."""

    path: str
    """A Hugging Face dataset id (m-a-p/MusicPile), or a local/remote (s3://, gs://) file, directory or glob."""
    format: Format = "auto"
    """auto (hub id when the path looks like owner/name and is no local path, else from the extension) | hub | parquet | jsonl | json | abc."""
    split: str = "train"
    """Hub datasets: read only the files whose path names this split (when any file does)."""
    revision: str | None = None
    """Hub datasets: branch, tag or commit sha (None = main), resolved once to the commit that every task reads and the manifest records; pass that sha to re-read the same rows."""
    weight: float = 1.0
    """Sampling weight = expected uses of each row: 0.5 keeps a deterministic half, 2 repeats every row twice."""
    src_weights: dict[str, float] = field(default_factory=dict)
    """Extra weights by the row's `src` value (MusicPile's source column), multiplied onto `weight`; unlisted = 1."""
    text_field: str | None = None
    """pt mode: this source's text column (default: TokenizeConfig.text_field)."""


@dataclass
class TokenizeConfig:
    """Ray Data tokenization of MusicPile-style corpora into training shards (pt or sft), with optional packing."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Inputs; several make a mixture (see SourceConfig.weight, src_weights and verbal_score_ratio)."""
    mode: Mode = "pt"
    """pt: continual pretraining on raw text | sft: instruction/input (masked) -> output (trained)."""
    tokenizer: str = "m-a-p/ChatMusician-Base"
    """Tokenizer hub id or local path (loaded with chatmusician.model.loading.load_tokenizer)."""
    max_len: int = 2048
    """Tokens per training row (the original's 2048)."""
    max_source_len: int = 1536
    """sft: source (instruction + input) tokens kept; longer sources are truncated (the original's 1536; at most max_len - 3)."""
    packing: Packing = "none"
    """none: one document/sample per row (the original) | greedy: fill max_len rows in order, positions restart per document."""
    text_field: str = "text"
    """pt: the text column."""
    add_eos: bool = True
    """pt: end every document with EOS (documents are joined with EOS); False gives the original's ids exactly (its pt rows had none)."""
    encoder: Literal["original", "fast"] = "original"
    """original: the ids of the original's slow LLaMA tokenizer (a legacy tokenizer: sentencepiece on each text between special tokens, from tokenizer.model; else the fast tokenizer, whose ids then match) | fast: the fast tokenizer's ids (with legacy, one space token fewer after each </s> and at a leading space)."""
    legacy: bool | None = None
    """LLaMA's `legacy` tokenization (a space token added after each special token and at a text's start); None = what the tokenizer's config says (transformers 5 reads a missing key as False, the original's 4.x as True)."""
    sft_template: Literal["auto", "always", "never"] = "auto"
    """sft: auto (rows already in chat form, like MusicPile-sft, verbatim as the original; raw rows wrapped in `Human: … </s> ` / `Assistant: … </s> `) | always (wrap every row) | never (every row verbatim)."""
    sft_truncate: bool = True
    """sft: truncate over-long samples like the original; False rejects them (reason too_long) instead."""
    max_row_chars: int = 4_000_000
    """Rows whose text fields together exceed this many characters are rejected as too_long (bounds worker memory)."""
    verbal_score_ratio: list[float] | None = None
    """Optional verbal:score row ratio, e.g. [2, 1] (the paper's); the larger class is subsampled to reach it (costs one extra read pass)."""
    seed: int = 0
    """Seed of the deterministic per-row sampling that fractional weights use."""
    val_fraction: float = 0.0
    """Rows held out for validation, chosen by a hash of the row id (deterministic, never in training): written to output_dir/val."""
    hub_root: str | None = None
    """A local directory standing in for the Hugging Face hub (holds datasets/<owner>/<name>/...); None = the real hub."""
    output_dir: str | None = None
    """Where write_shards puts parquet shards + manifest.json (local or s3://, gs://); None = run and count only."""
    train_batch_size: int = 8
    """Rows per training batch assumed by the manifest's padding fraction (the original's global batch 8)."""
    shard_rows: int = 2048
    """Rows per parquet shard."""
    batch_size: int = 512
    """Documents per tokenizer call; greedy packing fills rows within one batch (a batch never spans two work items), so larger batches pad less."""
    read_rows: int = 1024
    """Rows per block that reading a work item emits (re-cut into batch_size batches)."""
    num_tokenizers: int | None = None
    """Read+tokenize+pack tasks run at once (tokenizer loaded once per worker process); None = as many as the cluster's CPUs allow."""
    tokenizer_cpus: float = 1.0
    """CPUs each tokenize task reserves; a task holding 2 or more runs that many tokenizer threads."""
    read_cpus: float = 0.25
    """CPUs each read task of the verbal_score_ratio counting pass reserves (the main pass reads inside its tokenize tasks)."""
    read_retries: int = 5
    """Retries of a read that failed transiently (HTTP 429/5xx, reset connections), with exponential backoff; counted in the manifest."""
    retry_backoff_s: float = 1.0
    """Wait before the first retry of a read, doubled after each."""
    reject_samples: int = 20
    """How many rejected row ids (with reasons) the manifest keeps."""
    progress: bool = True
    """Show Ray Data progress bars."""
