"""OpenCompass's prompt machinery for PPL multiple choice, re-implemented literally (no dependency on it).

What the original ran (hf-lin/ChatMusician vendors OpenCompass; the same code is in ``opencompass`` 0.5.4):

* ``utils/prompt.py::safe_format``: ``for k, v in entry.items(): text = text.replace("{k}", str(v))``, over
  every column of the dataset row, in column order, also inside text an earlier replacement put there. So an ABC
  grace note written ``{A}`` becomes option A's text, and so does a ``{B}`` inside option A.
* ``FixKRetriever`` + ``BaseRetriever.generate_ice``: each shot is the ice template of its gold label filled by
  ``safe_format`` with the shot's row; shots are joined by ``"\\n"`` and followed by ``"\\n"``, so no shot at all
  gives ``"\\n"`` (``ZeroRetriever``: ``""``).
* ``PromptTemplate.generate_label_prompt_item``: the label's template, ``</E>`` replaced by the shots, then
  ``safe_format`` with the test row.
* ``PPLInferencer.inference``: labels in order; for each question, while the prompt has more than
  ``max_seq_len`` tokens (``len(tokenizer.encode(prompt))``) and shots are left, the last shot is dropped; the
  shorter shot list carries over to the following labels.
* ``utils/text_postprocessors.py::first_option_postprocess``: the generation-mode answer letter.

Pure functions: no torch, no Ray.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

ICE_TOKEN = "</E>"
_FIELD = re.compile(r"\{(\w+)\}")


def safe_format(text: str, entry: Mapping[str, Any]) -> str:
    """OpenCompass's ``safe_format``: successive ``str.replace`` of every ``{column}`` in column order."""
    for key, value in entry.items():
        text = text.replace(f"{{{key}}}", str(value))
    return text


def plain_format(text: str, entry: Mapping[str, Any]) -> str:
    """Fill each ``{column}`` of the template once, never looking inside the inserted values (what a reader of
    the config would expect; differs from :func:`safe_format` only for values holding ``{column}`` texts)."""
    return _FIELD.sub(lambda m: str(entry[m[1]]) if m[1] in entry else m[0], text)


def generate_ice(
    shots: Sequence[Mapping[str, Any]],
    ice_templates: Mapping[str, str],
    label_column: str = "target",
    separator: str = "\n",
    eos: str = "\n",
    literal: bool = True,
) -> str:
    """The in-context examples of one question (``FixKRetriever``: separator and end token ``"\\n"``)."""
    fill = safe_format if literal else plain_format
    items = [fill(ice_templates[str(s[label_column])].replace(ICE_TOKEN, ""), s) for s in shots]
    return separator.join(items) + eos


def label_prompt(template: str, ice: str, entry: Mapping[str, Any], literal: bool = True) -> str:
    """One candidate's prompt: shots inserted at ``</E>`` first, then the test row filled in (OpenCompass's
    order, so the row's values also replace ``{column}`` texts inside the shots when ``literal``)."""
    if literal:
        return safe_format(template.replace(ICE_TOKEN, ice), entry)
    head, _, tail = template.partition(ICE_TOKEN)
    return plain_format(head, entry) + (ice if ICE_TOKEN in template else "") + plain_format(tail, entry)


def ppl_prompts(
    entry: Mapping[str, Any],
    shots: Sequence[Mapping[str, Any]],
    templates: Mapping[str, str],
    ice_templates: Mapping[str, str] | None = None,
    token_len: Callable[[str], int] | None = None,
    max_seq_len: int | None = None,
    literal: bool = True,
    ice_eos: str = "\n",
) -> tuple[list[str], list[int], str]:
    """(one prompt per label in template order, the shots each kept, the full in-context text) as
    ``PPLInferencer`` builds them, shots dropped from the end while a prompt is over ``max_seq_len`` tokens."""
    kept = list(shots)

    def ice_of(rows: Sequence[Mapping[str, Any]]) -> str:
        if ice_templates is None:  # ZeroRetriever
            return ""
        return generate_ice(rows, ice_templates, eos=ice_eos, literal=literal)

    full_ice = ice_of(kept)
    texts, counts = [], []
    for template in templates.values():
        text = label_prompt(template, ice_of(kept), entry, literal)
        if token_len is not None and max_seq_len is not None:
            while kept and token_len(text) > max_seq_len:
                kept = kept[:-1]
                text = label_prompt(template, ice_of(kept), entry, literal)
        texts.append(text)
        counts.append(len(kept))
    return texts, counts, full_ice


# --- generation mode -----------------------------------------------------------------------------------------

_FIRST_OPTION_PATTERNS = (
    r"答案是?\s*([{o}])",
    r"答案是?\s*：\s*([{o}])",
    r"答案是?\s*:\s*([{o}])",
    r"答案选项应?该?是\s*([{o}])",
    r"答案选项应?该?为\s*([{o}])",
    r"答案应该?是\s*([{o}])",
    r"答案应该?选\s*([{o}])",
    r"答案选项为?\s*：\s*([{o}])",
    r"答案选项为?\s+\(?\*?\*?([{o}])\*?\*?\)?",
    r"答案选项是?\s*:\s*([{o}])",
    r"答案为\s*([{o}])",
    r"答案选\s*([{o}])",
    r"选择?\s*([{o}])",
    # OpenCompass lacks a comma after this one, so Python joins it with the next (kept as it runs)
    r"故选?\s*([{o}])" r"只有选?项?\s?([{o}])\s?是?对",
    r"只有选?项?\s?([{o}])\s?是?错",
    r"只有选?项?\s?([{o}])\s?不?正确",
    r"只有选?项?\s?([{o}])\s?错误",
    r"说法不?对选?项?的?是\s?([{o}])",
    r"说法不?正确选?项?的?是\s?([{o}])",
    r"说法错误选?项?的?是\s?([{o}])",
    r"([{o}])\s?是正确的",
    r"([{o}])\s?是正确答案",
    r"选项\s?([{o}])\s?正确",
    r"所以答\s?([{o}])",
    r"所以\s?([{o}][.。$]?$)",
    r"所有\s?([{o}][.。$]?$)",
    r"[\s，：:,]([{o}])[。，,\.]?$",
    r"[\s，,：:][故即]([{o}])[。\.]?$",
    r"[\s，,：:]因此([{o}])[。\.]?$",
    r"[是为。]\s?([{o}])[。\.]?$",
    r"因此\s?([{o}])[。\.]?$",
    r"显然\s?([{o}])[。\.]?$",
    r"答案是\s?(\S+)(?:。|$)",
    r"答案应该是\s?(\S+)(?:。|$)",
    r"答案为\s?(\S+)(?:。|$)",
    r"(?i)ANSWER\s*:\s*([{o}])",
    r"[Tt]he answer is:?\s+\(?([{o}])\)?",
    r"[Tt]he answer is:?\s+\(?\*?\*?([{o}])\*?\*?\)?",
    r"[Tt]he answer is option:?\s+\(?([{o}])\)?",
    r"[Tt]he correct answer is:?\s+\(?([{o}])\)?",
    r"[Tt]he correct answer is option:?\s+\(?([{o}])\)?",
    r"[Tt]he correct answer is:?.*?boxed\{([{o}])\}",
    r"[Tt]he correct option is:?.*?boxed\{([{o}])\}",
    r"[Tt]he correct answer option is:?.*?boxed\{([{o}])\}",
    r"[Tt]he answer to the question is:?\s+\(?([{o}])\)?",
    r"^选项\s?([{o}])",
    r"^([{o}])\s?选?项",
    r"(\s|^)[{o}][\s。，,：:\.$]",
    r"1.\s?(.*?)$",
    r"1.\s?([{o}])[.。$]?$",
)
_CUSHION_PATTERNS = (r"([{o}]):", r"([{o}])")


def first_option_postprocess(text: str, options: str = "ABCD", cushion: bool = True) -> str:
    """OpenCompass's ``first_option_postprocess`` (0.5.4): the first pattern that matches decides; ``""`` when
    none finds an option letter."""
    patterns = [p.replace("{o}", options) for p in _FIRST_OPTION_PATTERNS]
    if cushion:
        patterns += [p.replace("{o}", options) for p in _CUSHION_PATTERNS]
    text = text.strip()
    for pattern in patterns:
        match = re.search(pattern, text, re.DOTALL)
        if match:
            outputs = match.group(1) if match.group(1) else match.group(0)
            for letter in options:
                if letter in outputs:
                    return letter
    return ""
