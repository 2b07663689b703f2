"""The ABC in a model answer, as the API, the web UI and the chat CLI report it (no Serve, no torch)."""

from __future__ import annotations

from typing import Any


def _issue_dict(issue: Any) -> dict[str, Any]:
    return issue.to_dict() if hasattr(issue, "to_dict") else dict(issue)


def analyze_abc(text: str) -> dict[str, Any]:
    """The ABC in a model answer: every tune found, the first one (``abc``) and its validation report."""
    from chatmusician.abc import extract_tunes, validate_tune

    found = extract_tunes(text)
    tunes = list(found.tunes)
    return {
        "found": bool(found.found),
        "message": found.message,
        "tunes": tunes,
        "abc": tunes[0] if tunes else None,
        "issues": [_issue_dict(i) for i in found.issues],
        "validation": [_issue_dict(i) for i in validate_tune(tunes[0])] if tunes else [],
    }
