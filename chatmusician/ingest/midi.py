"""Read and clean one MIDI file: bounded parsing, drum and empty parts dropped, the melody (or several voices)
chosen, performance timing snapped to the beat grid, a pickup found, and a clean MIDI written back for midi2abc.

Pure functions over bytes; symusic (C++, thousands of times faster than mido on a large file) parses and writes.
Hostile files are refused before the parser sees them where the container tells (size, chunk count and sizes,
not MIDI at all), and every later failure is a :class:`MidiReject` with a reason, never an exception out of
:func:`read_score`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import symusic

from chatmusician.ingest.config import CleanConfig

PPQ = 480
"""Ticks per quarter note of every cleaned score (abc2midi's own resolution)."""
DRUM_CHANNEL = 9  # General MIDI channel 10


class MidiReject(ValueError):
    """A file that cannot become a tune; ``reason`` is the manifest's reject reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Note:
    start: int
    """Onset in ticks at :data:`PPQ`."""
    end: int
    pitch: int
    velocity: int


@dataclass
class Part:
    """The notes of one (track, channel) pair."""

    track: int
    channel: int
    notes: list[Note]
    name: str = ""
    program: int = 0


@dataclass
class Score:
    """A cleaned piece at :data:`PPQ` ticks per quarter."""

    parts: list[Part]
    meters: list[tuple[int, int, int]] = field(default_factory=list)
    """(tick, numerator, denominator) time signatures, the first at tick 0."""
    keys: list[tuple[int, int, bool]] = field(default_factory=list)
    """(tick, sharps (-7..7), minor) key signatures; empty when the file has none."""
    tempo_bpm: float = 120.0
    """Quarter notes per minute at the start."""
    title: str = ""
    meter_from_file: bool = False
    snapped: bool = False
    """Onsets were snapped to the beat grid (the file played like a performance)."""
    swung: bool = False
    """Swung 2:1 pairs were written as even 8ths."""
    lead_in: int = 0
    """Ticks of rest put before the first note so that bar lines fall where the music's strong beats are."""

    @property
    def pickup_beats(self) -> float:
        """Length of the pickup bar in quarter notes (0: the music starts on a downbeat)."""
        return (self.bar_ticks - self.lead_in) % self.bar_ticks / PPQ

    @property
    def bar_ticks(self) -> int:
        _, num, den = self.meters[0]
        return PPQ * 4 * num // den

    def all_notes(self) -> list[Note]:
        return sorted((n for p in self.parts for n in p.notes), key=lambda n: (n.start, -n.pitch))


# --- bounded reading ------------------------------------------------------------------------------------------


def check_container(data: bytes, cfg: CleanConfig) -> None:
    """Refuse what the parser should never see: too large, not a Standard MIDI File, too many track chunks,
    a header that lies about its tracks, or SMPTE timing (no beat grid)."""
    if not data:
        raise MidiReject("empty_file", "the file is empty")
    if len(data) > cfg.max_file_bytes:
        raise MidiReject("too_large", f"{len(data)} bytes, over the {cfg.max_file_bytes}-byte limit")
    if data[:4] == b"RIFF" and data[8:12] == b"RMID":  # RIFF-wrapped MIDI: the SMF sits in its data chunk
        at = data.find(b"MThd")
        data = data[at:] if at >= 0 else b""
    if data[:4] != b"MThd" or len(data) < 14:
        raise MidiReject("not_midi", "no MIDI header (MThd)")
    _, fmt, ntracks, division = struct.unpack(">IHHH", data[4:14])
    if fmt > 2:
        raise MidiReject("not_midi", f"unknown MIDI format {fmt}")
    if division & 0x8000:
        raise MidiReject("unsupported", "SMPTE time division: the file has no beat grid")
    if division == 0:
        raise MidiReject("corrupt", "zero ticks per quarter note")
    chunks, pos = 0, 8 + struct.unpack(">I", data[4:8])[0]
    while pos + 8 <= len(data):  # walk chunk headers only: a count bound before any parsing
        size = struct.unpack(">I", data[pos + 4 : pos + 8])[0]
        chunks += data[pos : pos + 4] == b"MTrk"
        if chunks > cfg.max_tracks:
            raise MidiReject("too_many_tracks", f"over {cfg.max_tracks} track chunks")
        pos += 8 + size
    if ntracks > cfg.max_tracks:
        raise MidiReject("too_many_tracks", f"the header declares {ntracks} tracks (limit {cfg.max_tracks})")
    if chunks < ntracks or pos > len(data):
        raise MidiReject("truncated", f"the header declares {ntracks} tracks; {chunks} are (partly) present")


def parse(data: bytes, cfg: CleanConfig) -> symusic.Score:
    check_container(data, cfg)
    try:
        return symusic.Score.from_midi(bytes(data))
    except Exception as exc:  # noqa: BLE001 - the parser's own words on a malformed file
        raise MidiReject("corrupt", f"unreadable MIDI: {type(exc).__name__}: {exc}"[:300]) from None


def _scale(tick: int, division: int) -> int:
    return round(tick * PPQ / division)


def first_track_name(data: bytes) -> str:
    """The first track's name meta event (a file's title, by convention), if it is readable text."""
    at = data.find(b"MTrk")
    size = struct.unpack(">I", data[at + 4 : at + 8])[0] if at >= 0 and len(data) >= at + 8 else 0
    chunk = data[at + 8 : at + 8 + size]
    k = chunk.find(b"\xff\x03")
    if k < 0 or k + 3 > len(chunk) or chunk[k + 2] > 127:
        return ""
    name = chunk[k + 3 : k + 3 + chunk[k + 2]].decode("latin-1").strip()
    printable = sum(c.isalnum() or c in " '-.,&()" for c in name)
    return name if name and printable == len(name) else ""


def extract(data: bytes, cfg: CleanConfig) -> Score:
    """Notes per track (symusic splits tracks by channel), meters, keys and the first tempo, at :data:`PPQ`;
    drums dropped. symusic (C++) parses in about a millisecond what takes mido seconds."""
    midi = parse(data, cfg)
    division = midi.ticks_per_quarter
    parts: list[Part] = []
    drums = events = 0
    for t, track in enumerate(midi.tracks):
        events += len(track.notes)
        if events > cfg.max_events:
            raise MidiReject("too_dense", f"over {cfg.max_events} notes")
        if track.is_drum and cfg.drop_drums:
            drums += len(track.notes)
            continue
        notes = [
            Note(_scale(n.time, division), _scale(n.time + n.duration, division), n.pitch, n.velocity)
            for n in track.notes
            if n.duration > 0
        ]
        if notes:
            name = track.name.strip()
            parts.append(Part(t, t, sorted(notes, key=lambda n: (n.start, n.pitch)), name, track.program))
    if not parts:
        if drums:
            raise MidiReject("drums_only", f"{drums} drum notes and no pitched ones")
        raise MidiReject("no_notes", "the file holds no notes")
    for tempo in midi.tempos:
        if not cfg.min_tempo_bpm <= tempo.qpm <= cfg.max_tempo_bpm:
            raise MidiReject(
                "bad_tempo",
                f"tempo {tempo.qpm:.4g} bpm at tick {tempo.time}, outside {cfg.min_tempo_bpm}-{cfg.max_tempo_bpm}",
            )
    for sig in midi.time_signatures:
        if not (1 <= sig.numerator <= 32 and sig.denominator in (1, 2, 4, 8, 16, 32)):
            raise MidiReject("bad_meter", f"time signature {sig.numerator}/{sig.denominator}")
    tempos = sorted((t.time, t.qpm) for t in midi.tempos)
    score = Score(
        parts=parts,
        meters=_changes(
            [(_scale(m.time, division), (m.numerator, m.denominator)) for m in midi.time_signatures]
        ),
        keys=_changes(
            [
                (_scale(k.time, division), (max(-7, min(7, k.key)), bool(k.tonality)))
                for k in midi.key_signatures
            ]
        ),
        tempo_bpm=round(tempos[0][1] if tempos and tempos[0][0] == 0 else 120.0, 3),
        title=first_track_name(data),
        meter_from_file=bool(midi.time_signatures),
    )
    if not score.meters or score.meters[0][0] != 0:
        score.meters.insert(0, (0, 4, 4))  # MIDI's default meter
    return score


def _changes(events: list[tuple[int, tuple]]) -> list[tuple]:
    """Flatten (tick, value) events, keeping the last one per tick and dropping repeats of the value in force."""
    by_tick: dict[int, tuple] = {}
    for tick, value in events:
        by_tick[tick] = value
    out: list[tuple] = []
    for tick in sorted(by_tick):
        if not out or out[-1][1:] != by_tick[tick]:
            out.append((tick, *by_tick[tick]))
    return out


_MAJOR_SHARPS = {"C": 0, "G": 1, "D": 2, "A": 3, "E": 4, "B": 5, "F#": 6, "C#": 7, "F": -1, "Bb": -2, "Eb": -3,
                 "Ab": -4, "Db": -5, "Gb": -6, "Cb": -7}  # fmt: skip
_MINOR_SHARPS = {"A": 0, "E": 1, "B": 2, "F#": 3, "C#": 4, "G#": 5, "D#": 6, "A#": 7, "D": -1, "G": -2, "C": -3,
                 "F": -4, "Bb": -5, "Eb": -6, "Ab": -7}  # fmt: skip


def key_name(sharps: int, minor: bool) -> str:
    """ABC key for a key signature: 2 sharps major -> ``D``, minor -> ``Bm``."""
    table = _MINOR_SHARPS if minor else _MAJOR_SHARPS
    name = next(k for k, v in table.items() if v == sharps)
    return name + ("m" if minor else "")


# --- cleaning -------------------------------------------------------------------------------------------------


def melody_score(part: Part) -> float:
    """How melody-like a part is: mostly one note at a time, high, and busy (abc2midi's chord and bass
    accompaniment, and real arrangements' pads and basses, lose on each)."""
    notes = part.notes
    onsets = len({n.start for n in notes})
    monophony = onsets / len(notes)
    mean_pitch = sum(n.pitch for n in notes) / len(notes)
    named = 12.0 if any(w in part.name.lower() for w in ("melody", "lead", "vocal", "voice", "tune")) else 0.0
    return monophony * 40 + mean_pitch + min(onsets, 400) / 20 + named


def join_chords(notes: list[Note], spread: int) -> list[Note]:
    """Notes starting within ``spread`` ticks of a chord's first note start with it (a strummed or staggered
    chord is one onset): otherwise the cut at the next onset would leave the first note a few ticks long."""
    out, first = [], None
    for n in sorted(notes, key=lambda n: (n.start, n.pitch)):
        if first is None or n.start - first > spread:
            first = n.start
        out.append(replace(n, start=first) if n.start != first and n.end - first > spread else n)
    return out


def skyline(notes: list[Note]) -> list[Note]:
    """One note at a time: the highest of each onset, cut where the next onset starts."""
    tops: dict[int, Note] = {}
    for n in notes:
        if n.start not in tops or n.pitch > tops[n.start].pitch:
            tops[n.start] = n
    starts = sorted(tops)
    out = []
    for i, s in enumerate(starts):
        n = tops[s]
        end = min(n.end, starts[i + 1]) if i + 1 < len(starts) else n.end
        out.append(replace(n, end=end))
    return out


def cut_overlaps(notes: list[Note]) -> list[Note]:
    """Chords kept (double stops), but no note sounds past the next onset: one voice, as ABC writes it."""
    starts = sorted({n.start for n in notes})
    following = dict(zip(starts, starts[1:], strict=False))
    return [replace(n, end=min(n.end, following.get(n.start, n.end))) for n in notes]


def off_grid_fraction(notes: Iterable[Note], divisions: tuple[int, ...], tolerance: float = 1 / 48) -> float:
    """Share of onsets farther than ``tolerance`` beats from the grid :func:`snap` would put them on: near 0
    for sequenced or notated MIDI, large for a played performance."""
    onsets = [n.start for n in notes]
    if not onsets:
        return 0.0
    grid = _snap_times(onsets, divisions)
    return sum(abs(grid[t] - t) > tolerance * PPQ for t in onsets) / len(onsets)


def _snap_times(times: list[int], divisions: tuple[int, ...]) -> dict[int, int]:
    """Tick -> snapped tick: within each beat, the subdivision (e.g. 16ths or triplet 8ths) that moves that
    beat's times least. A time just before a beat belongs to that beat."""
    smallest = max(divisions)
    by_beat: dict[int, list[int]] = {}
    for t in sorted(set(times)):
        by_beat.setdefault(int((t + PPQ / (2 * smallest)) // PPQ), []).append(t)
    out = {}
    for beat_times in by_beat.values():
        best = None
        for d in divisions:
            step = PPQ / d
            snapped = [round(round(t / step) * step) for t in beat_times]
            cost = sum(abs(a - b) for a, b in zip(beat_times, snapped, strict=True))
            if best is None or cost < best[0]:
                best = (cost, snapped)
        out.update(zip(beat_times, best[1], strict=True))
    return out


def snap(notes: list[Note], divisions: tuple[int, ...], legato_gap: float) -> list[Note]:
    """Onsets and ends on the beat grid; a note keeps at least one grid step; in a monophonic line a gap
    shorter than ``legato_gap`` beats before the next note is closed (a played legato, not a written rest)."""
    grid = _snap_times([n.start for n in notes] + [n.end for n in notes], divisions)
    step = PPQ // max(divisions)
    snapped = []
    for n in notes:
        start = grid[n.start]
        end = max(grid[n.end], start + step)
        snapped.append(replace(n, start=start, end=end))
    snapped.sort(key=lambda n: (n.start, n.pitch))
    dedup: dict[tuple[int, int], Note] = {}
    for n in snapped:  # two played notes snapped onto one: keep the longer
        key = (n.start, n.pitch)
        if key not in dedup or n.end > dedup[key].end:
            dedup[key] = n
    return close_gaps(sorted(dedup.values(), key=lambda n: (n.start, n.pitch)), round(legato_gap * PPQ))


def straighten_swing(notes: list[Note], min_share: float) -> tuple[list[Note], bool]:
    """A swung piece (long-short 2:1 pairs: onsets on a beat and 2/3 into it, nothing at 1/3) written as
    even 8ths, the way the notation has it (abc2midi plays ``R:Hornpipe`` tunes swung; so do players). Only
    when at least ``min_share`` of the beats that hold an off-beat onset are swung pairs."""
    two_thirds = 2 * PPQ // 3
    offbeats: dict[int, set[int]] = {}
    for n in notes:
        if n.start % PPQ:
            offbeats.setdefault(n.start // PPQ, set()).add(n.start % PPQ)
    swung = {beat for beat, at in offbeats.items() if at == {two_thirds}}
    if not offbeats or len(swung) < min_share * len(offbeats):
        return notes, False

    def move(t: int) -> int:  # ends may sit a tick or two early (abc2midi's note gaps)
        near = abs(t % PPQ - two_thirds) <= PPQ // 48 and t // PPQ in swung
        return t // PPQ * PPQ + PPQ // 2 if near else t

    return [replace(n, start=move(n.start), end=max(move(n.end), move(n.start) + 1)) for n in notes], True


def close_gaps(notes: list[Note], gap: int) -> list[Note]:
    if gap <= 0 or len({n.start for n in notes}) != len(notes):  # only a monophonic line
        return notes
    out = []
    for i, n in enumerate(notes):
        if i + 1 < len(notes) and 0 < notes[i + 1].start - n.end < gap:
            n = replace(n, end=notes[i + 1].start)
        out.append(n)
    return out


def find_pickup(notes: list[Note], bar: int, beat: int, step: int) -> int:
    """Ticks from the first onset to the first bar line (0: the piece starts on a downbeat).

    For files whose first note sits at tick 0, where the file itself says nothing about the bar grid (abc2midi
    starts a tune's MIDI with its pickup). Strong beats carry long and accented notes: each candidate (every
    ``step`` up to a bar) scores the notes on its downbeats (length in beats plus the velocity's z-score) and,
    at half weight, the lengths on other beats; a note tied over a bar line costs its length. Only a clear win
    over 0 moves the bar lines."""
    if not notes or bar <= step:
        return 0
    first = notes[0].start
    velocities = [n.velocity for n in notes]
    mean = sum(velocities) / len(velocities)
    spread = (sum((v - mean) ** 2 for v in velocities) / len(velocities)) ** 0.5

    def score(shift: int) -> float:
        total = 0.0
        for n in notes:
            at, until = n.start - first - shift, n.end - first - shift
            length = (n.end - n.start) / beat
            if at % bar == 0:
                total += length + (2 * (n.velocity - mean) / spread if spread else 0.0)
            elif at % beat == 0:
                total += 0.5 * length
            if until // bar > at // bar and until % bar:
                total -= length
        return total

    base = score(0)
    best_shift, best = 0, base
    for shift in range(step, bar, step):
        if (s := score(shift)) > best:
            best_shift, best = shift, s
    return best_shift if best > base + 0.05 * abs(base) + 1 else 0


def clean(score: Score, cfg: CleanConfig) -> Score:
    """Choose the parts to keep, make a melody monophonic, snap a performance to the grid, place the pickup."""
    parts = [p for p in score.parts if len(p.notes) >= cfg.min_part_notes]
    offset = min((n.start for p in parts for n in p.notes), default=0)
    if 0 < offset < PPQ // 8:  # abc2midi starts every note a tick late: keep the grid exact
        parts = [
            replace(p, notes=[replace(n, start=n.start - offset, end=n.end - offset) for n in p.notes])
            for p in parts
        ]
    if not parts:
        raise MidiReject("too_short", f"no part has {cfg.min_part_notes} or more notes")
    ranked = sorted(parts, key=melody_score, reverse=True)
    if cfg.voices == "melody":
        line = skyline if cfg.monophonic else cut_overlaps
        joined = join_chords(ranked[0].notes, round(cfg.chord_spread_beats * PPQ))
        chosen = [replace(ranked[0], notes=line(joined))]
    else:  # keep several as V: voices, melody first, then in track order
        chosen = [ranked[0]] + sorted(ranked[1 : cfg.max_voices], key=lambda p: (p.track, p.channel))
    every = [n for p in chosen for n in p.notes]
    snapped = cfg.snap == "always" or (
        cfg.snap == "auto" and off_grid_fraction(every, tuple(cfg.grid_divisions)) > cfg.performance_off_grid
    )
    if snapped:
        divisions = tuple(cfg.grid_divisions)
        chosen = [replace(p, notes=snap(p.notes, divisions, cfg.legato_gap_beats)) for p in chosen]
        if cfg.voices == "melody":
            chosen = [
                replace(p, notes=(skyline if cfg.monophonic else cut_overlaps)(p.notes)) for p in chosen
            ]
    swung = False
    if cfg.straighten_swing:
        straightened = [straighten_swing(p.notes, cfg.swing_share) for p in chosen]
        swung = any(flag for _, flag in straightened)
        if swung:
            chosen = [replace(p, notes=notes) for p, (notes, _) in zip(chosen, straightened, strict=True)]
    out = replace(score, parts=chosen, snapped=snapped, swung=swung)
    notes = out.all_notes()
    if len(notes) < cfg.min_notes:
        raise MidiReject("too_short", f"{len(notes)} notes, fewer than {cfg.min_notes}")
    span = (max(n.end for n in notes) - notes[0].start) / PPQ
    if span > cfg.max_beats:
        raise MidiReject("too_long", f"{span:.0f} quarter notes long (limit {cfg.max_beats:.0f})")
    if len(notes) / max(span, 1e-9) > cfg.max_notes_per_beat:
        raise MidiReject(
            "too_dense", f"{len(notes) / span:.1f} notes per beat (limit {cfg.max_notes_per_beat})"
        )
    if len(notes) > cfg.max_notes:
        raise MidiReject("too_long", f"{len(notes)} notes (limit {cfg.max_notes})")
    first = notes[0].start
    if len(out.meters) > 1:
        out.lead_in = first  # the file's own bar grid (it changes meter: keep its timeline as it is)
    elif first > 0 or not cfg.find_pickup:
        out.lead_in = first % out.bar_ticks  # the file's bar grid: bars from tick 0
    else:
        _, num, den = out.meters[0]
        beat = PPQ * 4 // den * (3 if num % 3 == 0 and num > 3 and den >= 8 else 1)  # 6/8: dotted quarter
        pickup = find_pickup(skyline(chosen[0].notes), out.bar_ticks, beat, max(PPQ * 2 // den, 1))
        out.lead_in = (out.bar_ticks - pickup) % out.bar_ticks
    return out


# --- writing --------------------------------------------------------------------------------------------------


def to_midi(score: Score) -> bytes:
    """The cleaned score as a MIDI file (tempo, meters and keys first, one track per part), starting at the
    downbeat before the first note (``lead_in`` ticks of rest before it)."""
    first = min(n.start for p in score.parts for n in p.notes)
    shift = score.lead_in - first  # the first note lands at `lead_in`; bar lines at multiples of the bar
    out = symusic.Score(PPQ)
    out.tempos.append(symusic.Tempo(0, qpm=score.tempo_bpm))
    for tick, num, den in score.meters:
        out.time_signatures.append(symusic.TimeSignature(max(tick + shift, 0) if tick else 0, num, den))
    for tick, sharps, minor in score.keys:
        out.key_signatures.append(
            symusic.KeySignature(max(tick + shift, 0) if tick else 0, sharps, int(minor))
        )
    for part in score.parts:
        track = symusic.Track(part.name, part.program, False)
        for n in part.notes:
            track.notes.append(symusic.Note(n.start + shift, n.end - n.start, n.pitch, n.velocity))
        out.tracks.append(track)
    return bytes(out.dumps_midi())


def read_score(data: bytes, cfg: CleanConfig) -> Score:
    """Bytes -> cleaned :class:`Score`, or :class:`MidiReject`."""
    return clean(extract(data, cfg), cfg)
