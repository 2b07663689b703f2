"""The original ChatMusician chat template and builders for its task families.

Template (exactly the original's, no BOS): ``Human: {prompt} </s> Assistant: ``; earlier turns are joined as
``Human: {q} </s> Assistant: {a} </s> ``. ``</s>`` is written as text and the LLaMA tokenizer maps it to EOS.
The task phrasings follow the original's demo and MusicPile-sft instructions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


def sft_source_target(row: Mapping[str, object]) -> tuple[str, str]:
    """MusicPile-sft row -> (source, target). Source = template(instruction + input), masked from the loss;
    target = output, trained (the tokenizer stage appends EOS)."""
    instruction = str(row.get("instruction") or "")
    extra = str(row.get("input") or "")
    prompt = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    return build_chat_prompt(prompt), str(row.get("output") or "")


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


def build_task_prompt(task: Task) -> str:
    """Task -> user prompt (not yet templated). Unknown family or missing field -> ValueError naming it."""
    builder = TASK_BUILDERS.get(task.family)
    if builder is None:
        raise ValueError(f"unknown task family {task.family!r}; choose one of {sorted(TASK_BUILDERS)}")
    try:
        return builder(task.fields)
    except KeyError as missing:
        raise ValueError(f"task {task.family!r} needs field {missing.args[0]!r}") from None


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
