"""MusPy 0.5.0's metric functions (muspy/metrics/metrics.py, MIT License, Copyright (c) 2020 Hao-Wen Dong),
copied without their docstrings, with a minimal stand-in for ``muspy.Music`` (tracks of notes with ``time``,
``end``, ``pitch``; ``resolution`` steps per quarter note). The project's re-implementation is held against
them (MusPy itself pulls in pretty_midi, pypianoroll and miditoolkit; it is not a dependency)."""

# fmt: off
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Note:
    time: int
    pitch: int
    duration: int

    @property
    def end(self):
        return self.time + self.duration


@dataclass
class Track:
    notes: list = field(default_factory=list)
    is_drum: bool = False

    def get_end_time(self):
        return max((n.end for n in self.notes), default=0)


@dataclass
class Music:
    tracks: list
    resolution: int = 24


def pitch_range(music: Music) -> int:
    if not music.tracks:
        return 0
    if not any(len(track.notes) > 0 for track in music.tracks):
        return 0
    highest = 0
    lowest = 127
    for track in music.tracks:
        if track.is_drum:
            continue
        for note in track.notes:
            if note.pitch > highest:
                highest = note.pitch
            if note.pitch < lowest:
                lowest = note.pitch
    return highest - lowest


def empty_beat_rate(music: Music) -> float:
    length = max(track.get_end_time() for track in music.tracks)
    if length < 1:
        return math.nan
    n_beats = length // music.resolution + 1
    is_empty = [True] * n_beats
    count = 0
    for track in music.tracks:
        for note in track.notes:
            start = note.time // music.resolution
            end = note.end // music.resolution
            for beat in range(start, end + 1):
                if is_empty[beat]:
                    is_empty[beat] = False
                    count += 1
    return 1 - (count / n_beats)


def _get_scale(root: int, mode: str):
    if mode == "major":
        c_scale = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], bool)
    elif mode == "minor":
        c_scale = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], bool)
    else:
        raise ValueError("`mode` must be either 'major' or 'minor'.")
    return np.roll(c_scale, root)


def pitch_in_scale_rate(music: Music, root: int, mode: str) -> float:
    scale = _get_scale(root, mode.lower())
    note_count = 0
    in_scale_count = 0
    for track in music.tracks:
        if track.is_drum:
            continue
        for note in track.notes:
            note_count += 1
            if scale[note.pitch % 12]:
                in_scale_count += 1
    if note_count < 1:
        return math.nan
    return in_scale_count / note_count


def scale_consistency(music: Music) -> float:
    max_in_scale_rate = 0.0
    for mode in ("major", "minor"):
        for root in range(12):
            rate = pitch_in_scale_rate(music, root, mode)
            if math.isnan(rate):
                return math.nan
            if rate > max_in_scale_rate:
                max_in_scale_rate = rate
    return max_in_scale_rate


def _entropy(prob):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(prob * np.log2(prob))


def pitch_class_entropy(music: Music) -> float:
    counter = np.zeros(12)
    for track in music.tracks:
        if track.is_drum:
            continue
        for note in track.notes:
            counter[note.pitch % 12] += 1
    denominator = counter.sum()
    if denominator < 1:
        return math.nan
    prob = counter / denominator
    return _entropy(prob)


def groove_consistency(music: Music, measure_resolution: int) -> float:
    length = max(track.get_end_time() for track in music.tracks)
    if measure_resolution < 1:
        raise ValueError("Measure resolution must be a positive integer.")
    n_measures = (length // measure_resolution) + 1
    if n_measures < 2:
        return math.nan
    groove_patterns = np.zeros((n_measures, measure_resolution), bool)
    for track in music.tracks:
        for note in track.notes:
            measure, position = divmod(note.time, measure_resolution)
            if not groove_patterns[measure, position]:
                groove_patterns[measure, position] = 1
    hamming_distance = np.count_nonzero(
        groove_patterns[:-1] != groove_patterns[1:]
    )
    return 1 - hamming_distance / (measure_resolution * (n_measures - 1))
