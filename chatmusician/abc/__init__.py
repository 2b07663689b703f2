"""ABC notation core: extract tunes from model output, parse and validate them, sanitize hostile input.

Pure functions, no Ray. The renderer and the serving app import from here.
"""

from chatmusician.abc.config import AbcCheckConfig, AbcLimits
from chatmusician.abc.fields import Key, parse_key, parse_meter, parse_tempo_bpm, parse_unit_length
from chatmusician.abc.issues import ERROR, WARNING, Issue, has_errors
from chatmusician.abc.parse import Tune, parse_tune
from chatmusician.abc.validate import bar_durations, validate_tune

__all__ = [
    "ERROR",
    "WARNING",
    "AbcCheckConfig",
    "AbcLimits",
    "Issue",
    "Key",
    "Tune",
    "bar_durations",
    "has_errors",
    "parse_key",
    "parse_meter",
    "parse_tempo_bpm",
    "parse_tune",
    "parse_unit_length",
    "validate_tune",
]
