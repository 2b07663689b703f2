"""Typed configs of preference data and rounds (``chatmusician prefs | rounds``). Dataclasses only."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatmusician.eval.config import PoolConfig


@dataclass
class RewardWeights:
    """Weights of the music rewards (each reward is in [0, 1]; the total is their weighted mean)."""

    parses: float = 1.0
    """A tune is found and the validator reports no error."""
    plays: float = 1.0
    """abc2midi (the renderer's judge, sandboxed) writes a MIDI that plays notes for a plausible length."""
    bar_alignment: float = 1.0
    """1 - bar-alignment error (NotaGen's BAE): the share of bars lasting what the meter says."""
    as_requested: float = 1.0
    """Share of what the prompt asked for (key, meter, unit length, bars) that the tune honours."""
    structure: float = 0.5
    """Folk-tune form: half for repeat signs / endings, half for reused bar pairs (motifs)."""
    novelty: float = 0.5
    """1 - similarity to the nearest training tune (needs train_tunes; 1 without them)."""
    strict: float = 0.0
    """1 when the tune is strictly valid (the rounds' guard: parses, plays, no bar off its meter, the asked key and
    meter), else 0: weighs the whole of the guard rather than its parts."""
    user: float = 1.0
    """Weight of the user reward (user_reward), when one is set."""


@dataclass
class PrefsConfig:
    """Sample N answers per prompt, score them with music rewards, pair top vs bottom: parquet + manifest
    (Ray Data batch inference over the evaluation's replica pool)."""

    model: str = "m-a-p/ChatMusician"
    """Model to sample from: hub id or local path."""
    tokenizer: str | None = None
    """Tokenizer hub id or path; default: the model's."""
    adapter: str | None = None
    """Optional PEFT adapter folder applied on top of the model (the current policy of a round)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    device: str = "auto"
    """cpu, cuda or auto."""
    prompts: str | None = None
    """JSON/JSONL file of {name, family, fields, request} prompts; default: the evaluation's shipped set."""
    n_per_prompt: int = 16
    """Answers sampled per prompt (NotaGen: ~100)."""
    max_new_tokens: int = 256
    """Tokens generated per answer."""
    temperature: float = 1.0
    """Sampling temperature (high: the pairs need varied answers)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    repetition_penalty: float = 1.1
    """Repetition penalty."""
    constrained: bool = False
    """Sample through the ABC grammar (chatmusician.model.constrained)."""
    seed: int = 0
    """Seed of every sample's own generator (sample k of prompt p: the same whatever batch it lands in)."""
    pair_fraction: float = 0.1
    """Per prompt: the top fraction (valid, non-copied) is paired with the bottom fraction (at least one each)."""
    chosen_strict: bool = False
    """Choose only strictly valid tunes (the strict reward's test), not merely ones that parse and play."""
    chosen_constrained: bool = False
    """Also sample n_per_prompt answers through constrained decoding with each request's key and meter (strictly
    valid by construction) and choose only among those, rejecting only free answers: the pairs teach the free
    model what constrained decoding guarantees (transformers engine)."""
    chosen_header: bool = False
    """Also sample n_per_prompt answers that start with the asked header (X:, M:, L:, K: from the request; free
    after it) and choose only among those, rejecting only free answers: the pairs teach writing the asked header."""
    weights: RewardWeights = field(default_factory=RewardWeights)
    """Reward weights."""
    user_reward: str | None = None
    """Optional ``module:function`` called as ``fn(text, request) -> float`` in [0, 1], added with weights.user."""
    check_midi: bool = True
    """Run abc2midi (sandboxed) for the plays reward; false: plays counts as 1 for tunes that parse."""
    train_tunes: str | None = None
    """Training tunes (ABC file or folder, or JSONL with text): near-copies (> 0.95 similar) are never chosen."""
    votes: str | None = None
    """The web UI's "two takes" picks (the Serve app's votes_path, JSON lines): added to the pairs as they are,
    with source web-ui (a corrupt or cut line is counted and skipped)."""
    output_dir: str = "./outputs/prefs"
    """Where pairs.parquet, samples.parquet and manifest.json go."""
    engine: str = "transformers"
    """transformers (the evaluation's replica pool; constrained decoding and adapters) or vllm (.venv-vllm; a merged model, unconstrained)."""
    vllm_python: str = ".venv-vllm/bin/python"
    """engine vllm: the vLLM environment's interpreter (env CHATMUSICIAN_VLLM_PYTHON overrides)."""
    vllm_kv_cache_gib: int = 1
    """engine vllm on CPU: KV-cache GiB per actor (VLLM_CPU_KVCACHE_SPACE)."""
    max_prompt_tokens: int = 512
    """engine vllm: prompt tokens the engine is sized for (max_model_len = this + max_new_tokens)."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Model replica pool (the evaluation's)."""


@dataclass
class GuardLimits:
    """How far a round may move a guard from round 0 (the model before preference training) before the loop stops."""

    validity_drop: float = 0.05
    """Largest fall of strict validity (a share: 0.05 = 5 points)."""
    bar_alignment_rise: float = 0.02
    """Largest rise of the mean bar-alignment error (absolute: MuPT's preference stage rose 0.8 % -> 4.7 %)."""
    diversity_ratio: float = 0.9
    """Smallest distinct-n relative to round 0."""
    memorisation_rise: float = 0.0
    """Largest rise of the share of near-copies of training tunes."""
    perplexity_ratio: float = 1.10
    """Largest validation perplexity relative to round 0."""


@dataclass
class RoundsConfig:
    """Preference rounds: prefs on the current model -> dpo -> evaluate, K times, each round's model the next
    round's policy and reference; a table and a plot of the guards, and a stop when a round worsens one past its
    limit."""

    rounds: int = 3
    """Rounds K (NotaGen: 3)."""
    model: str = "m-a-p/ChatMusician"
    """The model before round 1 (hub id or path)."""
    adapter: str | None = None
    """Optional adapter on top of it (an SFT run's adapter), merged in before round 1."""
    output_dir: str = "./outputs/rounds"
    """Per round: prefs/, runs/, model/ and eval/; at the top: rounds.md, rounds.csv, rounds.png, rounds.json."""
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    """Preference data settings (model, adapter and output_dir are set per round)."""
    dpo: str | None = None
    """YAML of a ``chatmusician dpo`` config (model, pairs, run_name, storage_path are set per round)."""
    eval_prompts: str | None = None
    """Prompts of the guard evaluation; default: the evaluation's shipped set."""
    eval_n_per_prompt: int = 4
    """Tunes per prompt in the guard evaluation (temperature 0.2, its own seeds: independent of the prefs samples)."""
    eval_max_new_tokens: int = 256
    """Tokens generated per tune in the guard evaluation."""
    val_shards: str | None = None
    """Tokenized validation split (an SFT run's val shards) for the validation perplexity guard; none: not measured."""
    limits: GuardLimits = field(default_factory=GuardLimits)
    """Guard limits."""
