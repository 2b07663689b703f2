"""Evaluation: MusicTheoryBench (OpenCompass PPL protocol and generation mode), MMLU through
lm-evaluation-harness, and the quality of generated ABC, run as Ray Data batch inference (``chatmusician eval``).

Pure logic in :mod:`mtb` (prompts, shuffles, letters, summaries), :mod:`scoring` (perplexity) and
:mod:`abc_quality`; the model replica in :mod:`replica`; Ray and file outputs at the edges (:mod:`runner`,
:mod:`report`); :mod:`hook` is the training recipe's optional evaluation hook.
"""
