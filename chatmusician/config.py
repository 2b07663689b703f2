"""Typed configs: dataclasses whose fields carry one-line docstrings, loaded from YAML, overridable from the CLI.

jsonargparse does the parsing (YAML files, nested dataclasses, ``--field value`` and ``--block.field value``
overrides, ``--help`` built from the field docstrings, ``--print_config``), so nothing here parses by hand.
Config modules hold dataclasses only (no torch/ray imports) so that the CLI's help stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)

C = TypeVar("C")


def make_parser(
    config_cls: type,
    prog: str | None = None,
    parser: ArgumentParser | None = None,
    exit_on_error: bool = True,
) -> ArgumentParser:
    """A parser taking ``--config FILE.yaml`` plus one flag per field of ``config_cls`` (nested with dots);
    ``exit_on_error=False`` raises ``argparse.ArgumentError`` instead of printing the usage and exiting."""
    parser = parser or ArgumentParser(
        prog=prog, description=(config_cls.__doc__ or "").strip(), exit_on_error=exit_on_error
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the fields below.")
    parser.add_class_arguments(config_cls)
    return parser


def namespace_to_config(config_cls: type[C], namespace: Namespace, parser: ArgumentParser) -> C:
    """Build the dataclass from a parsed namespace (nested dataclasses instantiated)."""
    init = parser.instantiate(namespace)
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(init).items() if k in names})


def parse_config(config_cls: type[C], args: Sequence[str] | None = None, prog: str | None = None) -> C:
    """Parse command-line ``args`` (``--config`` files first, then flags) into a ``config_cls`` instance."""
    parser = make_parser(config_cls, prog=prog)
    return namespace_to_config(
        config_cls, parser.parse_args(list(args) if args is not None else None), parser
    )


def load_config(config_cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Programmatic twin of :func:`parse_config`: a YAML file plus keyword overrides (dotted keys allowed)."""
    args: list[str] = []
    if path is not None:
        args += ["--config", str(path)]
    for key, value in overrides.items():
        args += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")]
    return parse_config(config_cls, args)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a config (for logging, manifests and Tune search spaces)."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# --- checks made before any work starts ------------------------------------------------------------------------

MODEL_REF_FIELDS = ("model", "tokenizer", "base_model", "adapter", "adapters")
"""Top-level config fields that name a model, tokenizer or adapter (a local path or a hub id)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A config value that cannot work, found before any cluster work; the message says what to pass instead."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_ref_problem(value: str) -> str | None:
    """Why a model/tokenizer/adapter reference cannot load (None when it may): a path that does not exist, or
    a hub id while the hub is offline and the id is not in the local cache."""
    if not value or "://" in value or Path(value).expanduser().exists():
        return None
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        return "no such folder"
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = any(
            isinstance(try_to_load_from_cache(value, name), str)
            for name in ("config.json", "tokenizer_config.json", "adapter_config.json")
        )
        if not cached:
            return "is a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
    return None


def check_model_refs(config: Any) -> None:
    """ConfigError naming the first of :data:`MODEL_REF_FIELDS` that cannot load, and what to pass instead."""
    for name in MODEL_REF_FIELDS:
        value = getattr(config, name, None)
        for ref in value if isinstance(value, list | tuple) else [value]:
            if isinstance(ref, str) and (problem := model_ref_problem(ref)):
                what = (
                    "a PEFT adapter folder (a training run's checkpoint adapter/)"
                    if name.startswith("adapter")
                    else "a local model folder (`chatmusician build-tiny` prints one)"
                )
                raise ConfigError(
                    f"{name} {ref!r}: {problem}; pass --{name} with {what} or a hub id such as "
                    "m-a-p/ChatMusician with the hub reachable"
                )
