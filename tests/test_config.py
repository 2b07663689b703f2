from dataclasses import dataclass, field

import pytest

from chatmusician.cli import build_parser, main
from chatmusician.config import dump_yaml, load_config, parse_config


@dataclass
class Inner:
    """Inner block."""

    r: int = 64
    """Rank."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules."""


@dataclass
class Outer:
    """Outer config."""

    lr: float = 1e-4
    """Learning rate."""
    name: str | None = None
    """Run name."""
    inner: Inner = field(default_factory=Inner)
    """Nested block."""


def test_yaml_then_flags_override_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\ninner:\n  r: 8\n  targets: [a, b]\n")
    cfg = parse_config(Outer, ["--config", str(path), "--inner.r", "4", "--name", "run1"])
    assert cfg == Outer(lr=0.5, name="run1", inner=Inner(r=4, targets=["a", "b"]))


def test_load_config_keyword_overrides_round_trip(tmp_path):
    cfg = load_config(Outer, None, **{"lr": 3e-4, "inner.targets": ["x"]})
    assert cfg.lr == 3e-4 and cfg.inner.targets == ["x"] and isinstance(cfg.inner, Inner)
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Outer, path) == cfg


def test_wrong_type_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(Outer, ["--lr", "fast"])
    assert "lr" in capsys.readouterr().err


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(Outer, ["--help"])
    out = capsys.readouterr().out
    for doc in ("Learning rate.", "Run name.", "Rank.", "Modules."):
        assert doc in out


def test_cli_lists_subcommands_and_their_field_docs(capsys):
    with pytest.raises(SystemExit):
        main(["build-tiny", "--help"])
    out = capsys.readouterr().out
    assert "SentencePiece BPE vocabulary size" in out
    assert "build-tiny" in build_parser().format_help()


def test_a_config_may_take_one_positional_argument():
    from typing import ClassVar

    from chatmusician.cli import positional_as_flag

    @dataclass
    class WithInput:
        POSITIONAL: ClassVar[str] = "input"
        input: str = ""

    assert positional_as_flag(WithInput, ["tune.abc", "--out", "d"]) == ["--input", "tune.abc", "--out", "d"]
    assert positional_as_flag(WithInput, ["--input", "x"]) == ["--input", "x"]
    assert positional_as_flag(Outer, ["stray"]) == ["stray"]  # no POSITIONAL: left for the parser to refuse
