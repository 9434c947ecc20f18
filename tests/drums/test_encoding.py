"""Specification of the drum_kit encoding: 9 drum classes, one bit each, 512 events."""

import numpy as np
import pytest

from solver.drums.encoding import (
    DRUM_PITCHES,
    NUM_CLASSES,
    NUM_EVENTS,
    STEPS_PER_BAR,
    STEPS_PER_QUARTER,
    event_to_pitches,
    events_to_hits,
    hits_to_events,
    parse_drum_steps,
    pitch_classes,
    pitches_to_event,
)


def test_constants_match_magenta_drum_kit():
    assert NUM_CLASSES == len(DRUM_PITCHES) == 9
    assert NUM_EVENTS == 512
    assert (STEPS_PER_QUARTER, STEPS_PER_BAR) == (4, 16)
    assert [p[0] for p in DRUM_PITCHES] == [36, 38, 42, 46, 45, 48, 50, 49, 51]


def test_each_pitch_belongs_to_one_class():
    pitches = [p for cls in DRUM_PITCHES for p in cls]
    assert len(pitches) == len(set(pitches))


def test_event_is_sum_of_class_bits():
    assert pitches_to_event([]) == 0
    assert pitches_to_event([36]) == 1
    assert pitches_to_event([36, 38, 42]) == 1 + 2 + 4
    assert pitches_to_event([51]) == 256
    # Secondary pitches map to their class: 35 is a kick, 44 a closed hi-hat, 52 a crash.
    assert pitches_to_event([35, 44, 52]) == 1 + 4 + 128


def test_same_class_twice_counts_once():
    assert pitches_to_event([36, 35, 36]) == 1


def test_unknown_pitches_are_ignored():
    # The kit covers General MIDI 2's drum range 27..87 plus 22 and 26; 60 is a bongo (mid tom).
    assert pitches_to_event([0, 21, 25, 90, 127]) == 0
    assert pitches_to_event([36, 88, 200, -1]) == 1
    assert pitch_classes(np.array([36, 60, 21, -5, 300])).tolist() == [0, 5, -1, -1, -1]


def test_event_decodes_to_first_pitch_of_each_class_in_order():
    assert event_to_pitches(0) == []
    assert event_to_pitches(1 + 2 + 4) == [36, 38, 42]
    assert event_to_pitches(NUM_EVENTS - 1) == [36, 38, 42, 46, 45, 48, 50, 49, 51]
    assert event_to_pitches(np.int64(256)) == [51]


def test_every_event_round_trips_through_pitches():
    for event in range(NUM_EVENTS):
        assert pitches_to_event(event_to_pitches(event)) == event


@pytest.mark.parametrize("bad", [-1, NUM_EVENTS, 10_000, 1.5, "3", True])
def test_invalid_event_is_rejected(bad):
    with pytest.raises(ValueError, match="drum event"):
        event_to_pitches(bad)


def test_vectorised_hits_round_trip():
    events = np.arange(NUM_EVENTS)
    hits = events_to_hits(events)
    assert hits.shape == (NUM_EVENTS, NUM_CLASSES)
    assert hits[7].tolist() == [True, True, True] + [False] * 6
    np.testing.assert_array_equal(hits_to_events(hits), events)


def test_vectorised_hits_reject_out_of_range_events():
    with pytest.raises(ValueError, match="out of range"):
        events_to_hits(np.array([0, 512]))


def test_magentas_primer_drums_syntax_gives_one_event_per_step():
    events = parse_drum_steps("[(36,),(),(42,), (36, 38, 42), (35,)]")
    assert events.tolist() == [1, 0, 4, 1 | 2 | 4, 1]  # 35 is a kick too


def test_primer_drums_is_read_as_a_literal_never_run():
    with pytest.raises(ValueError, match="not a Python list literal"):
        parse_drum_steps("[(36,)] + [__import__('os').getpid()]")
