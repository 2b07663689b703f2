"""``process_docs`` of the shipped lm-eval MusicTheoryBench tasks: the original loader's row conversion."""

from chatmusician.eval.mmlu import process_mtb_docs as process_docs

__all__ = ["process_docs"]
