"""MIDI ingestion: MIDI collections -> cleaned, normalised, round-trip-checked ABC rows for the data stage.

``chatmusician ingest-midi`` / ``ray_jobs.ingest_midi`` run :func:`chatmusician.ingest.pipeline.run`; the
modules, bottom up: ``midi`` (bounded reading and cleaning), ``convert`` (midi2abc in the render sandbox,
normalisation), ``roundtrip`` (the quality gate), ``tasks`` (SFT rows), ``pipeline`` (the Ray Data job),
``report`` (the Nottingham round trip behind ``reports/midi_roundtrip.md``).
"""
