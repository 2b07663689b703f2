"""Typed configs: dataclasses whose fields carry one-line docstrings, loaded from YAML, overridable from the CLI.

jsonargparse does the parsing (YAML files, nested dataclasses, ``--field value`` and ``--block.field value``
overrides, ``--help`` built from the field docstrings, ``--print_config``), so nothing here parses by hand.
Config modules hold dataclasses only (no torch/ray imports) so that the CLI's help stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)

C = TypeVar("C")


def make_parser(
    config_cls: type, prog: str | None = None, parser: ArgumentParser | None = None
) -> ArgumentParser:
    """A parser taking ``--config FILE.yaml`` plus one flag per field of ``config_cls`` (nested with dots)."""
    parser = parser or ArgumentParser(
        prog=prog, description=(config_cls.__doc__ or "").strip(), exit_on_error=True
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
