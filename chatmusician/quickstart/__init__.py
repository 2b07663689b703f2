"""The main job, end to end on an embedded local Ray: every stage of the platform at toy scale.

tiny LLaMA + tokenizer -> Ray Data tokenize (pt, packed; sft, with a validation split) -> Ray Train + DeepSpeed
full pretraining of the random tiny base -> Ray Tune: a 2-trial LoRA SFT sweep -> LoRA SFT with the winning
values -> merge -> evaluation (MusicTheoryBench fixtures, ABC quality) -> Ray Serve app -> compositions through
its HTTP API (free and grammar-constrained; the parse rate) -> a sandboxed render (MIDI, MP3, SVG, PNG) of a
composed tune -> ``summary.json``, ``loss.png`` and ``quickstart.log`` in ``out_dir``.

Why full pretraining, then LoRA: the tiny base is random, and a low-rank update of random weights learns little;
training every weight on the tunes is what ChatMusician's base got from LLaMA2 and continual pretraining, and
LoRA SFT then teaches the chat form as the original did.

The data are the 1,034 Nottingham tunes: as raw text for pretraining, and as "recreate this header as a score"
instructions for SFT (the paper's text-to-music task). A second run reuses every stage already done
(``stages/*.json``) unless ``force`` is set. The terminal gets the job's own lines (rich: stage headers, progress,
a final table); Ray's, the workers' and the libraries' own output goes to ``quickstart.log``.

The package, one module per stage: ``config`` (QuickstartConfig), ``console`` (terminal, log, progress),
``stages`` (numbering, timing, reuse), ``data`` (model, corpora, tokenize), ``training`` (pretrain, SFT),
``sweep``, ``evaluation``, ``app`` (Ray, the Serve app), ``compose``, ``render``, ``summary``; ``run`` reads
top to bottom as the platform's story. The HTTP calls go through :mod:`chatmusician.client`.
"""

from chatmusician.quickstart.config import QuickstartConfig
from chatmusician.quickstart.run import run

__all__ = ["QuickstartConfig", "run"]
