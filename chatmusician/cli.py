"""The ``chatmusician`` console script: one subcommand per workflow, each driven by that workflow's typed config.

Every subcommand takes ``--config FILE.yaml`` and one flag per config field (``--help`` lists them with their
docs). A workflow registers itself by adding one line to ``COMMANDS``: (config class, run function, help),
imported lazily so that one command's heavy imports never slow another's start.
"""

from __future__ import annotations

import importlib
import json
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from chatmusician.config import check_model_refs, make_parser, namespace_to_config

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
    "ingest-midi": (
        "chatmusician.ingest.config:IngestConfig",
        "chatmusician.ingest.pipeline:run",
        "MIDI -> cleaned, round-trip-checked ABC rows (pt + sft) + manifest (Ray Data, midi2abc sandboxed).",
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
    "sweep": (
        "chatmusician.tune.config:SweepConfig",
        "chatmusician.tune.sweep:run",
        "LoRA hyperparameter sweep (Ray Tune + ASHA on val_loss; results.csv, val_loss.png, best.yaml).",
    ),
    "plan": (
        "chatmusician.train.config:PlanConfig",
        "chatmusician.train.plan_report:run",
        "What a pretrain/sft config will cost per GPU, per step and per epoch; exit 2 when it cannot fit.",
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
        "Evaluate: MusicTheoryBench (PPL + generation), MMLU (OpenCompass PPL), ABC quality (Ray Data batch inference).",
    ),
    "prefs": (
        "chatmusician.prefs.config:PrefsConfig",
        "chatmusician.prefs.job:run",
        "Preference pairs: sample N answers per prompt, score with music rewards, pair top vs bottom (Ray Data).",
    ),
    "dpo": (
        "chatmusician.train.config:DPOConfig",
        "chatmusician.train.dpo_recipe:run",
        "Preference training (DPO / DPO-Positive / IPO) on pairs (Ray Train + DeepSpeed + LoRA).",
    ),
    "rounds": (
        "chatmusician.prefs.config:RoundsConfig",
        "chatmusician.prefs.rounds:run",
        "Preference rounds: prefs on the current model -> dpo -> evaluate, guards checked every round.",
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


def build_parser(exit_on_error: bool = True) -> ArgumentParser:
    parser = ArgumentParser(
        prog="chatmusician",
        description="ChatMusician on Ray: data, training, serving, rendering. "
        "--debug (anywhere) shows the traceback of a failure.",
        exit_on_error=exit_on_error,
    )
    subcommands = parser.add_subcommands(required=True, dest="command")
    for name, (config_path, _, help_text) in COMMANDS.items():
        sub = make_parser(_resolve(config_path), exit_on_error=exit_on_error)
        subcommands.add_subcommand(name, sub, help=help_text)
    return parser


def positional_as_flag(config_cls: type, args: Sequence[str]) -> list[str]:
    """``chatmusician render tune.abc …`` / ``abc-check a.abc b.abc``: a config class may name one field
    ``POSITIONAL``; leading bare arguments (``-`` is standard input) become that field's flag, a list when the
    class sets ``POSITIONAL_LIST``."""
    args = list(args)
    field_name = getattr(config_cls, "POSITIONAL", None)
    n = 0
    while n < len(args) and (args[n] == "-" or not args[n].startswith("-")):
        n += 1
    if not field_name or not n:
        return args
    if getattr(config_cls, "POSITIONAL_LIST", False):
        return [f"--{field_name}", json.dumps(args[:n]), *args[n:]]
    return [f"--{field_name}", args[0], *args[1:]]


def build_config(name: str, args: Sequence[str], exit_on_error: bool = True) -> Any:
    """The typed config of workflow ``name`` from its command-line arguments."""
    config_cls = _resolve(COMMANDS[name][0])
    args = positional_as_flag(config_cls, args)
    parser = make_parser(config_cls, prog=f"chatmusician {name}", exit_on_error=exit_on_error)
    return namespace_to_config(config_cls, parser.parse_args(list(args)), parser)


def run_command(name: str, args: Sequence[str]) -> Any:
    """Run one workflow from its command-line arguments (what ``ray_jobs/*`` entrypoints call)."""
    return _resolve(COMMANDS[name][1])(build_config(name, args))


def describe_error(exc: BaseException) -> str:
    """One line for a failed command: the project's own errors (bad values, missing files, unknown names) by
    their message; anything else with its type, since it is likely a bug (``--debug`` shows the traceback)."""
    cause = getattr(exc, "cause", None)  # Ray task errors wrap the worker's exception
    if isinstance(cause, BaseException):
        exc = cause
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, ArgumentError | ValueError | LookupError | FileNotFoundError | NotADirectoryError):
        return message or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or message}: {exc.filename}"
    return f"{type(exc).__name__}: {message} (--debug shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: a mistake in the command line, the config or the inputs is one line on stderr and
    exit status 2 (1 for a failure of the work itself), never a traceback unless ``--debug`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    name = argv[0] if argv and argv[0] in COMMANDS else None
    prog = f"chatmusician {name}" if name else "chatmusician"
    try:
        if name:
            argv[1:] = positional_as_flag(_resolve(COMMANDS[name][0]), argv[1:])
        build_parser(exit_on_error=False).parse_args(argv)  # validates the whole command line, serves --help
        config = build_config(argv[0], argv[1:], exit_on_error=False)
        if not getattr(config, "model_config", None):  # plan may read a config.json given instead of model
            check_model_refs(config)  # before any Ray or model work starts
        _resolve(COMMANDS[argv[0]][1])(config)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        user_error = isinstance(exc, ArgumentError | ValueError | LookupError | OSError)
        hint = f" (see {prog} --help)" if isinstance(exc, ArgumentError) else ""
        print(f"{prog}: error: {describe_error(exc)}{hint}", file=sys.stderr)
        return 2 if user_error else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
