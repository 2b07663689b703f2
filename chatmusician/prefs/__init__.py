"""Preference data from music rewards (``chatmusician prefs``) and preference-training rounds (``rounds``).

:mod:`~chatmusician.prefs.rewards` and :mod:`~chatmusician.prefs.pairs` are pure functions; :mod:`.job` samples
through the evaluation's replica pool (Ray Data) and writes the pairs; :mod:`.rounds` loops prefs -> dpo -> eval.
"""
