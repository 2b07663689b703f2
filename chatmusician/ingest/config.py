"""Config of MIDI ingestion (``chatmusician ingest-midi``): sources, cleaning, conversion, quality gate, output.

Dataclasses only (no ray/mido imports) so that the CLI's help stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatmusician.render.config import SandboxConfig

Voices = Literal["melody", "voices"]
Snap = Literal["auto", "always", "never"]


@dataclass
class MidiSourceConfig:
    """One input: MIDI files, or a parquet column of MIDI bytes."""

    path: str
    """A local or remote (s3://, gs://) MIDI file, folder (searched recursively), glob, or parquet file/folder."""
    format: Literal["auto", "midi", "parquet"] = "auto"
    """auto: parquet for .parquet files, MIDI otherwise | midi | parquet."""
    column: str = "midi"
    """parquet: the column of MIDI bytes."""
    id_column: str | None = None
    """parquet: a column naming each row (default: file:row)."""
    extensions: list[str] = field(default_factory=lambda: [".mid", ".midi", ".kar", ".smf"])
    """Folder and glob listings keep files with these extensions (case-insensitive)."""


@dataclass
class CleanConfig:
    """How a MIDI file is cleaned before conversion, and what is refused."""

    voices: Voices = "melody"
    """melody: the most melody-like part alone, one note at a time | voices: up to max_voices parts as V: voices."""
    monophonic: bool = False
    """melody mode: keep only the top note of each onset (False keeps a melody's double stops as ABC chords)."""
    max_voices: int = 4
    """voices mode: most parts kept (the melody first)."""
    drop_drums: bool = True
    """Drop General MIDI channel 10 (drums)."""
    min_part_notes: int = 8
    """Parts with fewer notes are dropped as empty."""
    min_notes: int = 16
    """Fewer notes in the kept parts: rejected as too_short."""
    max_notes: int = 20_000
    """More notes in the kept parts: rejected as too_long (bounds conversion time)."""
    max_beats: float = 20_000.0
    """A longer piece (quarter notes from first onset to last end): rejected as too_long (bounds midi2abc's output)."""
    max_notes_per_beat: float = 12.0
    """More notes per quarter note over the piece: rejected as too_dense (no ABC reader could follow it)."""
    snap: Snap = "auto"
    """Snap onsets and ends to the beat grid: auto (when the timing looks played: see performance_off_grid) | always | never."""
    performance_off_grid: float = 0.1
    """auto: snap when more than this share of onsets lies over 1/48 beat off the grid_divisions grid."""
    grid_divisions: list[int] = field(default_factory=lambda: [4, 3])
    """Subdivisions of a quarter note a beat may use when snapped (16ths or triplet 8ths, chosen per beat)."""
    legato_gap_beats: float = 0.25
    """Snapped melody: a gap shorter than this (quarter notes) before the next note is closed, not a rest."""
    chord_spread_beats: float = 1 / 24
    """Notes starting this close (quarter notes) to a chord's first note join it (staggered chords: abc2midi's are 1/48 apart)."""
    straighten_swing: bool = True
    """Write a swung piece's long-short 2:1 pairs as even 8ths, as notation does (see swing_share)."""
    swing_share: float = 0.5
    """Swing is assumed when at least this share of the beats with an off-beat onset are 2:1 pairs."""
    find_pickup: bool = True
    """Look for a pickup (anacrusis) and put the bar lines after it (single-meter pieces)."""
    max_file_bytes: int = 4_000_000
    """Larger files are rejected unread as too_large (bounds parser memory)."""
    max_tracks: int = 256
    """Files with more track chunks are rejected before parsing."""
    max_events: int = 1_000_000
    """Files with more MIDI events are rejected while parsing (bounds memory)."""
    min_tempo_bpm: float = 20.0
    """Slower tempos (quarter notes per minute) are rejected as bad_tempo."""
    max_tempo_bpm: float = 400.0
    """Faster tempos are rejected as bad_tempo."""


@dataclass
class ConvertConfig:
    """How midi2abc is run and its output normalised."""

    unit_lengths: list[int] = field(default_factory=lambda: [8, 16])
    """L: 1/N unit note lengths given to midi2abc (-aul N), tried in order until the round trip passes the gate: 8 suits fiddle tunes; 16 quantises finer (ornaments, 32nds)."""
    broken_rhythm: bool = False
    """Let midi2abc write broken rhythm (> <); off (-nb) because it also mis-hears swung or uneven 8ths."""
    guess_key: str = "missing"
    """missing: midi2abc guesses the key (-gk) when the file has no key signature | always | never (C)."""
    retry_without_triplets: bool = True
    """When no unit length passes the gate, try them again with -nt (midi2abc hears some long-note bars as triplets)."""
    extra_args: list[str] = field(default_factory=list)
    """More midi2abc options, e.g. [-gu] (guess the unit: the report measures it), [-s] (keep very short notes)."""
    bars_per_line: int = 4
    """Bars per line of the normalised tune."""
    keep_tempo: bool = True
    """Write the Q: tempo field."""
    keep_title: bool = True
    """Write a T: title from the MIDI track name, when it has one (never midi2abc's 'from x.mid')."""
    sandbox: SandboxConfig = field(default_factory=lambda: SandboxConfig(timeout_s=20.0, cpu_s=20))
    """Limits of each midi2abc / abc2midi run."""


@dataclass
class GateConfig:
    """The quality gate: validator, then a round trip (abc2midi back to MIDI) against the cleaned input."""

    min_onset_f1: float = 0.9
    """Onset+pitch F1 on the beat grid between the round trip and the cleaned input; lower: low_agreement."""
    min_pitch_agreement: float = 0.9
    """Pitch-sequence agreement (difflib ratio of the top notes in order); lower: low_agreement."""
    min_bar_agreement: float = 0.9
    """Share of bars whose duration matches the meter (pickups and section ends excepted); lower: bad_bars."""
    onset_tolerance_beats: float = 0.0625
    """Onsets this close (quarter notes) count as the same (half a 32nd)."""
    render_check: bool = False
    """Also render each accepted tune to SVG with abcm2ps (slower; the tests check rendering anyway)."""


@dataclass
class SftTaskConfig:
    """Which MusicPile-sft-style rows to derive from each accepted tune."""

    tasks: list[str] = field(default_factory=lambda: ["continue", "header", "harmonize"])
    """continue: first half -> the rest | header: meter/key/rhythm text -> the tune | harmonize: melody -> the voices (voices mode, 2+ voices)."""
    continue_fraction: float = 0.5
    """continue: share of the bars given as the prompt."""
    min_bars: int = 4
    """Tunes with fewer bars give no continue row."""


@dataclass
class IngestConfig:
    """MIDI -> ABC ingestion as a Ray Data job: clean, midi2abc (sandboxed), normalise, round-trip gate, rows."""

    sources: list[MidiSourceConfig] = field(default_factory=list)
    """Inputs: MIDI files, folders, globs, s3-style URIs, or parquet columns of MIDI bytes."""
    output_dir: str = "outputs/ingest_midi"
    """Where pt/ and sft/ parquet rows and manifest.json are written (local or s3://, gs://)."""
    src: str = "midi"
    """The rows' `src` value (MusicPile's source column)."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """Cleaning and refusal limits."""
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    """midi2abc options and normalisation."""
    gate: GateConfig = field(default_factory=GateConfig)
    """Round-trip quality thresholds."""
    sft: SftTaskConfig = field(default_factory=SftTaskConfig)
    """Derived instruction rows."""
    shard_rows: int = 4096
    """Rows per output parquet file."""
    files_per_task: int = 16
    """MIDI files (or parquet rows) converted per Ray task."""
    task_cpus: float = 0.5
    """CPUs each conversion task reserves (the tools run as subprocesses)."""
    reject_samples: int = 20
    """How many rejected ids (with reasons and messages) the manifest keeps."""
    progress: bool = True
    """Show Ray Data progress bars."""
