"""The offline stand-in for LLaMA2-7B: a SentencePiece-BPE tokenizer trained here on real ABC tunes plus
music-theory text, and tiny ``LlamaForCausalLM`` configs, saved in Hugging Face format.

Everything downstream loads the result exactly as it would load ``m-a-p/ChatMusician-Base``: by passing a
path (or, through :func:`install_in_hub_cache`, a hub-style id) to ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from chatmusician import corpora

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class TinySize:
    """Shape of one tiny LLaMA; same architecture as LLaMA2 (RMSNorm, RoPE, SwiGLU), fewer and narrower layers."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


TINY_SIZES: dict[str, TinySize] = {
    "nano": TinySize(128, 344, 4, 4, 4),  # ~1.8 M parameters with the default vocabulary
    "micro": TinySize(256, 688, 4, 8, 8),  # ~5 M
    "small": TinySize(512, 1376, 8, 8, 8),  # ~29 M
}
DEFAULT_VOCAB_SIZE = 4000
MAX_POSITION_EMBEDDINGS = 4096


def tokenizer_corpus() -> list[str]:
    """Lines the tokenizer learns from: Nottingham + music21 folk tunes (not Essen) + the theory text asset."""
    lines: list[str] = []
    for path in corpora.nottingham_files() + corpora.music21_abc_files():
        lines += [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    lines += [
        ln for ln in (ASSETS / "music_theory.txt").read_text(encoding="utf-8").splitlines() if ln.strip()
    ]
    return lines


def train_tokenizer(out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0) -> Path:
    """Train a LLaMA-style SentencePiece BPE model (byte fallback, <unk>=0, <s>=1, </s>=2, no pad) and save it
    with ``save_pretrained`` so that ``tokenizer.model`` (the slow, sentencepiece path) and ``tokenizer.json``
    (the fast path) both exist and give the same ids."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # LLaMA's settings: no normalisation, keep runs of spaces (ABC spacing groups notes into beams).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9999,
        num_threads=1,  # one thread: the same corpus always gives the same merges
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": False,  # the ChatMusician template has no BOS
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": MAX_POSITION_EMBEDDINGS,
            }
        )
    )
    # Loading converts the sentencepiece model into a fast tokenizer; saving writes tokenizer.json beside it.
    AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
    return out_dir


def build_tiny_model(
    out_dir: str | Path, size: str = "nano", vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0
) -> Path:
    """Write a randomly initialised tiny LLaMA plus its tokenizer into ``out_dir`` (one HF repo layout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    train_tokenizer(out_dir, vocab_size=vocab_size, seed=seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        **asdict(TINY_SIZES[size]),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0  # LLaMA has no pad token; the original pads with <unk>
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _fingerprint(size: str, vocab_size: int, seed: int) -> str:
    """Changes when the builder, the corpus or the arguments change, so the cache never serves a stale model."""
    h = hashlib.sha256(f"{size}-{vocab_size}-{seed}".encode())
    h.update(Path(__file__).read_bytes())
    h.update((ASSETS / "music_theory.txt").read_bytes())
    for p in corpora.nottingham_files():
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("CHATMUSICIAN_CACHE", Path.home() / ".cache" / "chatmusician"))


def ensure_tiny(size: str = "nano", vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0) -> Path:
    """Path of the cached tiny model + tokenizer, building it once (safe under concurrent callers)."""
    from filelock import FileLock

    target = cache_root() / f"tiny-llama-{size}-{_fingerprint(size, vocab_size, seed)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_model(tmp, size=size, vocab_size=vocab_size, seed=seed)
            tmp.rename(target)
    return target


def install_in_hub_cache(
    src_dir: str | Path, repo_id: str, hub_cache: str | Path, revision: str = "0" * 40
) -> Path:
    """Lay ``src_dir`` out as the Hugging Face hub cache would after downloading ``repo_id``, so that
    ``from_pretrained(repo_id)`` with ``HF_HUB_OFFLINE=1`` resolves it through the real hub code path."""
    repo_dir = Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(src_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def run_build(cfg) -> Path:
    """CLI entry: build (or reuse) a tiny model and print where it is."""
    if cfg.out_dir:
        path = build_tiny_model(cfg.out_dir, size=cfg.size, vocab_size=cfg.vocab_size, seed=cfg.seed)
    else:
        path = ensure_tiny(cfg.size, vocab_size=cfg.vocab_size, seed=cfg.seed)
    if cfg.hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE

        install_in_hub_cache(path, cfg.hub_id, HF_HUB_CACHE)
    print(path)
    return path
