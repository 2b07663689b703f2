"""ABC notation core: extract tunes from model output, parse and validate them, sanitize hostile input.

Pure functions, no Ray, no subprocesses; the renderer and the serving app import from here::

    from chatmusician.abc import sanitize, extract_tunes, parse_tune, validate_tune

    cleaned = sanitize(model_output)            # forbidden directives stripped, limits checked
    found = extract_tunes(cleaned.text)         # normalized tunes, or found.message == "no ABC found"
    for tune in found.tunes:
        issues = validate_tune(tune)            # [Issue(severity, code, message, line, column), ...]
"""

from chatmusician.abc.config import AbcCheckConfig, AbcLimits
from chatmusician.abc.extract import NO_ABC, ExtractResult, extract_tunes
from chatmusician.abc.fields import Key, parse_key, parse_meter, parse_tempo_bpm, parse_unit_length
from chatmusician.abc.issues import ERROR, WARNING, Issue, has_errors
from chatmusician.abc.parse import Tune, parse_tune
from chatmusician.abc.sanitize import SanitizeResult, sanitize
from chatmusician.abc.validate import bar_durations, validate_tune

__all__ = [
    "ERROR",
    "NO_ABC",
    "WARNING",
    "AbcCheckConfig",
    "AbcLimits",
    "ExtractResult",
    "Issue",
    "Key",
    "SanitizeResult",
    "Tune",
    "bar_durations",
    "extract_tunes",
    "has_errors",
    "parse_key",
    "parse_meter",
    "parse_tempo_bpm",
    "parse_tune",
    "parse_unit_length",
    "sanitize",
    "validate_tune",
]
