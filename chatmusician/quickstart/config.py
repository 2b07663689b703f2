"""The quickstart's typed config: every stage's defaults, sized for 2 CPU cores (``chatmusician quickstart --help``
lists them; configs/quickstart.yaml and the command line override any of them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatmusician.eval.config import AbcQualityConfig, EvalConfig, MTBConfig, PoolConfig
from chatmusician.prefs.config import PrefsConfig, RoundsConfig
from chatmusician.train.config import DPOConfig, LoraConfig, PretrainConfig, SFTConfig
from chatmusician.tune.config import AshaConfig, SweepConfig

GENERATED = ("data", "shards", "runs", "sweep", "models", "preference", "eval", "render", "stages")
"""The folders of out_dir this job writes (``force`` removes these and nothing else)."""


def _cpu_stage(config_cls, run_name: str, **values):
    """Stage defaults sized for 2 CPU cores (the paper's values live in configs/pretrain.yaml and sft.yaml)."""
    defaults = dict(
        run_name=run_name,
        profile="cpu",
        zero_stage=2,
        num_workers=2,
        cpus_per_worker=0.5,
        global_batch_size=8,
        micro_batch_size=4,
        keep_last=1,
        max_failures=1,
        log_every=10,
    )
    return lambda: config_cls(**{**defaults, **values})


def _sweep_defaults() -> SweepConfig:
    return SweepConfig(
        command="sft",
        overrides={"max_steps": 30, "eval_every": 10, "checkpoint_every": 30, "log_every": 10},
        space={"lr": {"grid": [5e-4, 3e-3]}},
        search="grid",
        num_samples=1,
        asha=AshaConfig(enabled=False),
        name="sweep",
    )


@dataclass
class QuickstartConfig:
    """The main job on one machine: every stage of the platform on the tiny offline model and real ABC tunes."""

    out_dir: str = "./outputs/quickstart"
    """Where data, shards, runs, the sweep, models, eval, renders, summary.json, loss.png and quickstart.log go."""
    force: bool = False
    """Redo every stage (a second run otherwise reuses the stages it finished: out_dir/stages/*.json)."""
    model_size: str = "nano"
    """Tiny model size (nano | micro | small); real runs use configs/pretrain.yaml with a hub id instead."""
    max_tunes: int = 1034
    """How many Nottingham tunes to use (all 1,034 by default)."""
    max_len: int = 512
    """Token block length for packing and training (every stage's max_length); SFT rows longer than this are
    left out rather than cut, so the model only ever learns whole tunes that end (the median tune is ~280 tokens)."""
    val_fraction: float = 0.05
    """Share of the SFT rows held out as the validation split the sweep ranks trials on."""
    pretrain: PretrainConfig = field(
        default_factory=_cpu_stage(
            PretrainConfig,
            "quickstart-pretrain",
            train_type="full",
            lr=3e-3,
            max_steps=300,
            warmup_ratio=0.03,
        )
    )
    """Pretraining of the random tiny base on the raw tunes (model, data, storage_path and max_length are filled in by the job)."""
    sweep: SweepConfig = field(default_factory=_sweep_defaults)
    """Ray Tune sweep of the SFT stage (base and storage_path are filled in by the job); its winning values go to sft."""
    sft: SFTConfig = field(
        default_factory=_cpu_stage(
            SFTConfig,
            "quickstart-sft",
            lora=LoraConfig(r=16, alpha=32, dropout=0.05),
            lr=2e-3,
            max_steps=80,
            eval_every=40,
        )
    )
    """LoRA SFT on the pretrained base (model, data, storage_path and max_length are filled in by the job)."""
    preference: bool = True
    """Run one preference round on the SFT model (prefs -> DPO-Positive -> merge); the next stages use its model."""
    prefs_prompts: int = 8
    """Text-to-music requests the preference round samples answers for and measures its guards on."""
    rounds: RoundsConfig = field(
        default_factory=lambda: RoundsConfig(
            prefs=PrefsConfig(
                device="cpu", n_per_prompt=8, max_new_tokens=512, pair_fraction=0.25,
                pool=PoolConfig(replicas=1, num_cpus=1.0, batch_size=8),
            ),
            eval_n_per_prompt=4,
            eval_max_new_tokens=512,
        )
    )  # fmt: skip
    """The preference round's sampling, rewards and guard limits (model, prompts and paths are filled in by the job)."""
    dpo: DPOConfig = field(
        default_factory=_cpu_stage(
            DPOConfig,
            "quickstart-dpo",
            lora=LoraConfig(r=16, alpha=32, dropout=0.0),
            lr=5e-4,
            max_steps=16,
            global_batch_size=4,
            micro_batch_size=2,
            max_prompt_length=128,
        )
    )
    """DPO-Positive on the preference pairs (model, pairs and paths are filled in per round)."""
    eval: EvalConfig = field(
        default_factory=lambda: EvalConfig(
            mtb=MTBConfig(modes=["ppl_zero_shot", "ppl_few_shot"], bootstrap=200),
            abc_quality=AbcQualityConfig(enabled=True, n_per_prompt=1, max_new_tokens=320),
            pool=PoolConfig(replicas=1, num_cpus=1.0, batch_size=4),
        )
    )
    """Evaluation of the final model (model and output_dir are filled in by the job)."""
    compose_prompts: int = 16
    """Compositions asked of the running app per arm (free and constrained): the parse rate's sample."""
    compose_max_new_tokens: int = 640
    """Token budget of each composition (Nottingham tunes: median ~280 tokens, 95th percentile ~550)."""
    compose_temperature: float = 0.2
    """Sampling temperature of the compositions (the original's default)."""
    parse_goal: float = 0.8
    """Share of free (unconstrained) compositions that should parse; the summary says whether it was met."""
    render_formats: list[str] = field(default_factory=lambda: ["midi", "mp3", "svg", "png"])
    """Formats rendered for the composed tune (or, if none parses, a reference tune, saying so)."""
    num_cpus: int = 4
    """Logical CPUs of the embedded Ray (more than the cores, so Data tasks never starve train workers)."""
    keep_serving: bool = False
    """Leave the API and web UI running at the end until Ctrl-C (default: stop, and print the command that serves)."""
    log_file: str = "quickstart.log"
    """File in out_dir that receives Ray's, the workers' and the libraries' output."""
