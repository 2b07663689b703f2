"""Config of the offline tiny-model factory (``chatmusician build-tiny``)."""

from dataclasses import dataclass


@dataclass
class TinyModelConfig:
    """Build a tiny LLaMA-architecture model and a locally trained tokenizer (the offline stand-in for LLaMA2-7B)."""

    out_dir: str | None = None
    """Where to write the HF-format model + tokenizer; default: the shared cache (~/.cache/chatmusician)."""
    size: str = "nano"
    """One of nano (~1.8 M parameters), micro (~5 M), small (~29 M)."""
    vocab_size: int = 4000
    """SentencePiece BPE vocabulary size (LLaMA2 uses 32000)."""
    seed: int = 0
    """Seed for weight initialisation and tokenizer training."""
    hub_id: str | None = None
    """Also install it in the HF hub cache under this id (e.g. my-org/tiny-chatmusician) for offline hub-id loads."""
