"""The ``chatmusician`` console script: one subcommand per workflow, each driven by that workflow's typed config.

Every subcommand takes ``--config FILE.yaml`` and one flag per config field (``--help`` lists them with their
docs). A workflow registers itself by adding one line to ``COMMANDS``: (config class, run function, help),
imported lazily so that one command's heavy imports never slow another's start.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from chatmusician.config import make_parser, namespace_to_config

COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": (
        "chatmusician.quickstart:QuickstartConfig",
        "chatmusician.quickstart:run",
        "The main job: every stage end to end on the tiny model and real tunes, on a local Ray.",
    ),
    "build-tiny": (
        "chatmusician.model.config:TinyModelConfig",
        "chatmusician.model.tiny:run_build",
        "Build the offline tiny LLaMA model and tokenizer.",
    ),
    "abc-check": (
        "chatmusician.abc.config:AbcCheckConfig",
        "chatmusician.abc.check:run_check",
        "Validate ABC files: JSON issues per tune.",
    ),
    "tokenize": (
        "chatmusician.data.config:TokenizeConfig",
        "chatmusician.data.pipeline:run",
        "Tokenize corpora (pt|sft) into parquet shards + manifest (Ray Data).",
    ),
    "pretrain": (
        "chatmusician.train.config:PretrainConfig",
        "chatmusician.train.recipe:run",
        "Continual pretraining (Ray Train + DeepSpeed + LoRA).",
    ),
    "sft": (
        "chatmusician.train.config:SFTConfig",
        "chatmusician.train.recipe:run",
        "Supervised fine-tuning (Ray Train + DeepSpeed + LoRA).",
    ),
    "merge": (
        "chatmusician.train.config:MergeConfig",
        "chatmusician.model.merge:run",
        "Merge a LoRA adapter into its base model.",
    ),
    "render": (
        "chatmusician.render.config:RenderCommandConfig",
        "chatmusician.render.command:run_render",
        "Render ABC to MIDI, WAV, MP3, SVG, PNG (sandboxed).",
    ),
    "chat": (
        "chatmusician.serve.config:ChatConfig",
        "chatmusician.chat:run_chat",
        "Chat with a model in the terminal, or answer a prompts file in batch.",
    ),
    "eval": (
        "chatmusician.eval.config:EvalConfig",
        "chatmusician.eval.runner:run",
        "Evaluate: MusicTheoryBench (PPL + generation), MMLU (lm-eval), ABC quality (Ray Data batch inference).",
    ),
    "serve": (
        "chatmusician.serve.config:ServeAppConfig",
        "chatmusician.serve.app:run_serve",
        "Run the Serve app (REST, OpenAI API, web UI) on a local Ray.",
    ),
}


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="chatmusician", description="ChatMusician on Ray: data, training, serving, rendering."
    )
    subcommands = parser.add_subcommands(required=True, dest="command")
    for name, (config_path, _, help_text) in COMMANDS.items():
        subcommands.add_subcommand(name, make_parser(_resolve(config_path)), help=help_text)
    return parser


def positional_as_flag(config_cls: type, args: Sequence[str]) -> list[str]:
    """``chatmusician render tune.abc …``: a config class may name one field ``POSITIONAL``; a leading bare
    argument becomes that field's flag."""
    args = list(args)
    field_name = getattr(config_cls, "POSITIONAL", None)
    if field_name and args and not args[0].startswith("-"):
        args[:1] = [f"--{field_name}", args[0]]
    return args


def run_command(name: str, args: Sequence[str]) -> Any:
    """Run one workflow from its command-line arguments (what ``ray_jobs/*`` entrypoints call)."""
    config_path, run_path, _ = COMMANDS[name]
    config_cls = _resolve(config_path)
    args = positional_as_flag(config_cls, args)
    parser = make_parser(config_cls, prog=f"chatmusician {name}")
    return _resolve(run_path)(namespace_to_config(config_cls, parser.parse_args(list(args)), parser))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        argv[1:] = positional_as_flag(_resolve(COMMANDS[argv[0]][0]), argv[1:])
    build_parser().parse_args(argv)  # validates the whole command line and serves --help
    run_command(argv[0], argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
