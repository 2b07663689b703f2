"""Problems found in ABC text, as plain data: what the CLI prints, the renderer returns and the UI shows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ERROR = "error"
"""The tools would fail or play/print something else than written: do not render."""
WARNING = "warning"
"""Suspicious but renderable (e.g. a bar one beat short)."""


@dataclass(frozen=True)
class Issue:
    """One problem. ``line``/``column`` are 1-based and relative to the text that was checked."""

    severity: str
    """"error" or "warning"."""
    code: str
    """Stable snake_case identifier, e.g. "bar_duration", "forbidden_directive", "too_many_bars"."""
    message: str
    """Human-readable explanation."""
    line: int | None = None
    column: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def has_errors(issues: list[Issue]) -> bool:
    return any(issue.severity == ERROR for issue in issues)
