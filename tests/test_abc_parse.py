"""parse_tune and the field parsers: header fields, key/mode, meter, unit length, tempo, voices."""

from __future__ import annotations

from fractions import Fraction

import pytest

from chatmusician.abc import Tune, parse_key, parse_meter, parse_tempo_bpm, parse_tune, parse_unit_length
from chatmusician.corpora import nottingham_tunes


def test_header_fields_body_and_musical_context():
    tune = parse_tune(
        "X: 12\nT:First\nT:Alternative\nC:Trad\nR:reel\nP:AB\nM:C|\nL:1/8\nQ:1/2=100\nK:A dor\nP:A\n|:eA~A2 BAGB:|\n"
    )
    assert isinstance(tune, Tune)
    assert tune.number == 12 and tune.title == "First"
    assert tune.headers["T"] == ["First", "Alternative"] and tune.headers["R"] == ["reel"]
    assert list(tune.headers) == ["X", "T", "C", "R", "P", "M", "L", "Q", "K"]
    assert (tune.key.tonic, tune.key.mode) == ("A", "dorian")
    assert tune.meter == Fraction(1) and tune.meter_text == "C|"
    assert tune.unit_length == Fraction(1, 8) and tune.tempo_bpm == 100
    assert tune.body == "P:A\n|:eA~A2 BAGB:|\n" and tune.body_line == 11
    assert tune.issues == []


@pytest.mark.parametrize(
    ("value", "tonic", "mode"),
    [
        ("G", "G", "major"),
        ("Em", "E", "minor"),
        ("Bbm", "Bb", "minor"),
        ("F# minor", "F#", "minor"),
        ("Ador", "A", "dorian"),
        ("D Mixolydian", "D", "mixolydian"),
        ("E phr", "E", "phrygian"),
        ("Cmaj clef=bass", "C", "major"),
        ("D ^g _b", "D", "major"),
        ("HP", "D", "major"),
        ("none", None, "major"),
        ("", "C", "major"),
    ],
)
def test_key_and_mode(value, tonic, mode):
    key = parse_key(value)
    assert (key.tonic, key.mode) == (tonic, mode)


@pytest.mark.parametrize("value", ["H", "Gmajestic", "Bn", "X#", "C clef=bass blah"])
def test_bad_keys_raise_value_error(value):
    with pytest.raises(ValueError):
        parse_key(value)


@pytest.mark.parametrize(
    ("value", "meter"),
    [
        ("6/8", Fraction(3, 4)),
        ("C", Fraction(1)),
        ("C|", Fraction(1)),
        ("(2+3)/8", Fraction(5, 8)),
        ("none", None),
        ("", None),
    ],
)
def test_meter(value, meter):
    assert parse_meter(value) == meter


@pytest.mark.parametrize("value", ["FREI4/4", "3/0", "six-eight", "4/"])
def test_bad_meters_raise(value):
    with pytest.raises(ValueError):
        parse_meter(value)


def test_unit_length_default_follows_the_meter():
    assert parse_tune("X:1\nM:2/4\nK:C\nC|").unit_length == Fraction(1, 16)
    assert parse_tune("X:1\nM:3/4\nK:C\nC|").unit_length == Fraction(1, 8)
    assert parse_tune("X:1\nK:C\nC|").unit_length == Fraction(1, 8)
    assert parse_tune("X:1\nM:2/4\nL:1/4\nK:C\nC|").unit_length == Fraction(1, 4)
    assert parse_unit_length("1") == 1
    with pytest.raises(ValueError):
        parse_unit_length("1/0")


@pytest.mark.parametrize(
    ("value", "bpm"), [("1/4=120", 120), ("96", 96), ('"Allegro" 3/8=40', 40), ('"Lento"', None)]
)
def test_tempo(value, bpm):
    assert parse_tempo_bpm(value) == bpm


def test_voices_from_header_body_and_inline_fields():
    tune = parse_tune("X:1\nV:S clef=treble\nV:A\nK:C\nV:S\nCDEF|\nV:A\nC,D,E,F,|\n[V:T] C,,4|")
    assert tune.voices == ["S", "A", "T"]


def test_unreadable_values_become_issues_with_positions():
    tune = parse_tune("X:one\nT:Bad\nM:FREI4/4\nK:H\nCDEF|\n[K:Q]GABc|")
    found = {(i.code, i.line, i.column) for i in tune.issues}
    assert found == {
        ("invalid_number", 1, 3),
        ("invalid_meter", 3, 3),
        ("invalid_key", 4, 3),
        ("invalid_key", 6, 4),
    }
    assert tune.key is None and tune.meter is None


def test_missing_key_is_an_error_and_the_body_still_found():
    tune = parse_tune("X:1\nT:No key\nM:4/4\nCDEF GABc|")
    assert [(i.code, i.severity) for i in tune.issues] == [("missing_key", "error")]
    assert tune.body == "CDEF GABc|"


def test_never_raises_on_odd_input():
    for text in ["", "\n\n", "K:", "X:\nK:\n", "+:continued", "%%only a directive", "[[[[", "X:1\nK:C\n[K:"]:
        assert isinstance(parse_tune(text), Tune)


def test_every_nottingham_header_reads():
    tunes = [parse_tune(t) for t in nottingham_tunes()]
    assert len(tunes) == 1034
    assert all(t.number is not None and t.key is not None and t.title for t in tunes)
    assert {t.meter_text for t in tunes} >= {"4/4", "6/8", "3/4", "2/4", "9/8"}
