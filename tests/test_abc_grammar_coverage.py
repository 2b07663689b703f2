"""Coverage of the ABC grammar on real tunes, token by token with the real tokenizer (writes a report).

A tune counts as genuinely malformed when the grammar rejects it AND abc2midi reports an error on it; the goal
is >= 99 % of the other tunes accepted, in the Nottingham set and in music21's folk collections.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from chatmusician import corpora
from chatmusician.abc.grammar import tune_grammar

REPORT = Path(__file__).resolve().parents[1] / "reports" / "abc_grammar_coverage.md"


def abc2midi_errors(tune: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.abc"
        path.write_text(tune + "\n", encoding="utf-8")
        number = tune.split("\n", 1)[0][2:].strip() or "1"
        out = subprocess.run(
            ["abc2midi", str(path), number, "-o", str(Path(tmp) / "t.mid")],
            capture_output=True,
            text=True,
            timeout=30,
        )
    return [line for line in out.stdout.splitlines() if line.startswith("Error")]


def coverage(tokenizer, tunes: list[str]) -> tuple[int, list[dict]]:
    import llguidance

    from chatmusician.model.constrained import ll_tokenizer

    spec = llguidance.LLMatcher.grammar_from_lark(tune_grammar(renderable=False))
    pristine = llguidance.LLMatcher(ll_tokenizer(tokenizer), spec, log_level=0)
    rejects = []
    for tune in tunes:
        ids = tokenizer(" " + tune + "\n", add_special_tokens=False)["input_ids"]
        matcher = pristine.deep_copy()
        n = matcher.validate_tokens(ids)
        if n == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting():
            continue
        where = tokenizer.decode(ids[max(0, n - 6) : n]) + " ⟨here⟩ " + tokenizer.decode(ids[n : n + 3])
        rejects.append({"tune": tune, "where": where, "abc2midi": abc2midi_errors(tune)})
    return len(tunes), rejects


@pytest.mark.integration
def test_grammar_accepts_the_corpora(tiny_model_path):
    from chatmusician.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    # A blank line ends an ABC tune: what follows it in a file is not part of the tune.
    clean = lambda tunes: [t.replace("\r", "").split("\n\n")[0] for t in tunes]  # noqa: E731
    lines = [
        "# ABC grammar coverage",
        "",
        "`pytest tests/test_abc_grammar_coverage.py` (token by token, tiny tokenizer)",
        "",
    ]
    lines += [
        "| corpus | tunes | accepted | rejected, abc2midi errors too | other rejects | accepted of the rest |"
    ]
    lines += ["|---|---|---|---|---|---|"]
    details = []
    for name, tunes in [
        ("Nottingham", clean(corpora.nottingham_tunes())),
        ("music21 folk", clean(corpora.read_tunes(corpora.music21_abc_files()))),
    ]:
        total, rejects = coverage(tokenizer, tunes)
        malformed = [r for r in rejects if r["abc2midi"]]
        other = [r for r in rejects if not r["abc2midi"]]
        rate = (total - len(rejects)) / (total - len(malformed))
        lines.append(
            f"| {name} | {total} | {total - len(rejects)} ({(total - len(rejects)) / total:.1%}) | "
            f"{len(malformed)} | {len(other)} | {rate:.2%} |"
        )
        for r in rejects:
            reason = f"abc2midi: {r['abc2midi'][0][:80]}" if r["abc2midi"] else "abc2midi accepts it"
            head = r["tune"].split("\n")[0]
            details.append(f"- {name} `{head}`: at `{r['where']!r}` — {reason}")
        assert rate >= 0.99, (name, rate, [r["where"] for r in other][:10])
        assert len(rejects) / total <= 0.025, (name, len(rejects))
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text("\n".join(lines + ["", "## Rejected tunes", "", *details, ""]), encoding="utf-8")
