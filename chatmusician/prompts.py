"""The original ChatMusician chat template and builders for its task families.

Template (exactly the original's, no BOS): ``Human: {prompt} </s> Assistant: ``; earlier turns are joined as
``Human: {q} </s> Assistant: {a} </s> ``. ``</s>`` is written as text and the LLaMA tokenizer maps it to EOS.
The task phrasings follow the original's demo and MusicPile-sft instructions.

Training and inference agree: an sft row is trained as source ``Human: {prompt} </s> `` (masked) and target
``Assistant: {answer} </s> `` (MusicPile-sft's own form, see :func:`sft_source_target`), and Serve, ``chat`` and
eval prompt with :func:`build_chat_prompt`, i.e. that source followed by the target's ``Assistant: ``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

HUMAN = "Human: "
SEP = " </s> "
ASSISTANT = "Assistant: "


def format_turn(prompt: str, answer: str | None = None) -> str:
    """One turn; an open turn (``answer is None``) ends with ``Assistant: `` for the model to continue."""
    text = f"{HUMAN}{prompt}{SEP}{ASSISTANT}"
    return text if answer is None else f"{text}{answer}{SEP}"


def build_chat_prompt(prompt: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """Multi-turn prompt: every earlier (question, answer) closed with ``</s>``, the new question left open."""
    return "".join(format_turn(q, a) for q, a in history) + format_turn(prompt)


SftTemplate = Literal["auto", "always", "never"]
"""How sft rows become (source, target): see :func:`sft_source_target`."""


def is_chat_form(instruction: str, input_: str, output: str) -> bool:
    """Is a row already in the original's chat form (MusicPile-sft: ``input`` ends with `` </s> ``, ``output``
    starts with ``Assistant: ``)? Either sign is enough."""
    return output.lstrip().startswith(ASSISTANT.strip()) or (instruction + input_).rstrip().endswith(
        SEP.strip()
    )


def sft_source_target(row: Mapping[str, object], template: SftTemplate = "auto") -> tuple[str, str]:
    """sft row ``{instruction, input, output}`` -> (source, target); the source is masked from the loss.

    - A row already in chat form (MusicPile-sft; ``template`` "auto" or "never") is used as the original's
      data_preprocess.py used it: source = ``instruction + input`` (no separator), target = ``output``.
    - A raw row (users' own data; "auto" or "always") is put into that same form first: source =
      ``Human: {instruction}\n{input} </s> `` and target = ``Assistant: {output} </s> ``, so that training on
      it and prompting with :func:`build_chat_prompt` (``Human: {prompt} </s> Assistant: ``) agree.

    "never" takes every row verbatim; "always" wraps every row (for raw data that happens to look templated).
    """
    instruction = str(row.get("instruction") or "")
    extra = str(row.get("input") or "")
    output = str(row.get("output") or "")
    if template == "never" or (template == "auto" and is_chat_form(instruction, extra, output)):
        return instruction + extra, output
    if template not in ("auto", "always"):
        raise ValueError(f"sft template must be auto, always or never, got {template!r}")
    prompt = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    return f"{HUMAN}{prompt}{SEP}", f"{ASSISTANT}{output}{SEP}"


# --- task families of the paper (text/chords/form/motif/harmonization/style -> music; form/motif analysis) ---

HEADER_LABELS = {
    "M": "Meter",
    "L": "Note Length",
    "K": "Key",
    "R": "Rhythm",
    "T": "Title",
    "C": "Composer",
    "O": "Origin",
    "N": "Notes",
    "Z": "Transcription",
    "B": "Book",
    "S": "Source",
}


def text_to_music(description: Mapping[str, str]) -> str:
    """Header-style description (e.g. ``{"M": "6/8", "K": "G", "R": "jig"}`` or label keys) -> score request."""
    lines = [f"{HEADER_LABELS.get(k, k)} {v}" for k, v in description.items() if str(v).strip()]
    return "Using ABC notation, recreate the given text as a musical score.\n" + "\n".join(lines)


def chord_conditioned(chords: Sequence[str]) -> str:
    return "Develop a musical piece using the given chord progression.\n" + ", ".join(
        f"'{c}'" for c in chords
    )


def musical_form(form: str) -> str:
    """``form`` as section letters, e.g. ``"AABB"`` or ``"ABA"``."""
    return f"Compose a piece of music in ABC notation that follows the musical form '{form}'."


def motif_and_form(form: str, motif_abc: str) -> str:
    return (
        "Create music by following the alphabetic representation of the assigned musical structure and the "
        f"given motif.\n'{form}';{motif_abc}"
    )


def harmonization(melody_abc: str) -> str:
    return f"Construct smooth-flowing chord progressions for the supplied music.\n{melody_abc}"


def style(composer_or_style: str) -> str:
    return f"Develop a tune influenced by {composer_or_style}'s compositions."


def analyze_form(tune_abc: str) -> str:
    return f"Analyze the musical form of the given tune and answer with its section letters.\n{tune_abc}"


def analyze_motif(tune_abc: str) -> str:
    return f"Identify the main motif of the given tune and write it in ABC notation.\n{tune_abc}"


@dataclass(frozen=True)
class Task:
    """A task request as the API and CLI take it: a family name plus that family's fields."""

    family: str
    fields: Mapping[str, object]


TASK_BUILDERS = {
    "text_to_music": lambda f: text_to_music(f["description"]),
    "chords": lambda f: chord_conditioned(f["chords"]),
    "form": lambda f: musical_form(f["form"]),
    "motif_form": lambda f: motif_and_form(f["form"], f["motif"]),
    "harmonize": lambda f: harmonization(f["melody"]),
    "style": lambda f: style(f["style"]),
    "analyze_form": lambda f: analyze_form(f["abc"]),
    "analyze_motif": lambda f: analyze_motif(f["abc"]),
}


# Each family's fields and their JSON shape: "text" (a string), "texts" (a non-empty list of strings),
# "labels" (an object of label -> string or number).
TASK_FIELDS = {
    "text_to_music": {"description": "labels"},
    "chords": {"chords": "texts"},
    "form": {"form": "text"},
    "motif_form": {"form": "text", "motif": "text"},
    "harmonize": {"melody": "text"},
    "style": {"style": "text"},
    "analyze_form": {"abc": "text"},
    "analyze_motif": {"abc": "text"},
}
_SHAPES = {
    "text": "a string",
    "texts": "a non-empty list of strings",
    "labels": "an object of label -> string",
}


class TaskError(ValueError):
    """A task request that cannot become a prompt; ``field`` names the field at fault (None: the family)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _fits(value: object, shape: str) -> bool:
    if shape == "text":
        return isinstance(value, str)
    if shape == "texts":
        return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
        for k, v in value.items()
    )


def build_task_prompt(task: Task) -> str:
    """Task -> user prompt (not yet templated). Unknown family, missing field or a field of the wrong type
    -> :class:`TaskError` (a ValueError) naming it."""
    builder = TASK_BUILDERS.get(task.family)
    if builder is None:
        raise TaskError(f"unknown task family {task.family!r}; choose one of {sorted(TASK_BUILDERS)}")
    if not isinstance(task.fields, Mapping):
        raise TaskError(f"task {task.family!r}: 'fields' must be an object", "fields")
    for name, shape in TASK_FIELDS[task.family].items():
        if name not in task.fields:
            raise TaskError(f"task {task.family!r} needs field {name!r}", name)
        value = task.fields[name]
        if not _fits(value, shape):
            got = type(value).__name__
            raise TaskError(f"task {task.family!r}: field {name!r} must be {_SHAPES[shape]}, got {got}", name)
    return builder(task.fields)


# The original demo's example prompts (web UI and CLI offer these).
EXAMPLE_PROMPTS = [
    text_to_music(
        {
            "Meter": "C",
            "Notes": "The parts are commonly interchanged.",
            "Transcription": "1997 by John Chambers",
            "Key": "D",
            "Note Length": "1/8",
            "Rhythm": "reel",
        }
    ),
    chord_conditioned(["Dm", "C", "Dm", "Dm", "C", "Dm", "C", "Dm"]),
    motif_and_form("ABCA", "E2GB d2c2|c2BA B2G2|"),
    style("Bach"),
]
