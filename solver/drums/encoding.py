"""Magenta's drum_kit encoding: one event per 16th-note step, a 9-bit set of drum classes.

General MIDI drum pitches are reduced to 9 classes (note_seq `DEFAULT_DRUM_TYPE_PITCHES`);
the event at a step is the sum of `2**class` over the classes struck there, so there are
`2**9 = 512` events and event 0 is silence. Decoding writes the first pitch of each class.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# note_seq drums_encoder_decoder.DEFAULT_DRUM_TYPE_PITCHES; the first pitch is the one we write.
DRUM_PITCHES: tuple[tuple[int, ...], ...] = (
    (36, 35),  # kick
    (38, 27, 28, 31, 32, 33, 34, 37, 39, 40, 56, 65, 66, 75, 85),  # snare
    (42, 44, 54, 68, 69, 70, 71, 73, 78, 80, 22),  # closed hi-hat
    (46, 67, 72, 74, 79, 81, 26),  # open hi-hat
    (45, 29, 41, 43, 61, 64, 84),  # low tom
    (48, 47, 60, 63, 77, 86, 87),  # mid tom
    (50, 30, 62, 76, 83),  # high tom
    (49, 52, 55, 57, 58),  # crash
    (51, 53, 59, 82),  # ride
)
DRUM_NAMES: tuple[str, ...] = (
    "kick",
    "snare",
    "closed hi-hat",
    "open hi-hat",
    "low tom",
    "mid tom",
    "high tom",
    "crash",
    "ride",
)
NUM_CLASSES = 9
NUM_EVENTS = 2**NUM_CLASSES  # 512
STEPS_PER_QUARTER = 4
STEPS_PER_BAR = 16  # 4/4 at 4 steps per quarter
SILENCE = 0

# pitch -> class index, -1 for pitches outside the kit; indexable by any MIDI pitch 0..127.
PITCH_TO_CLASS: np.ndarray = np.full(128, -1, dtype=np.int64)
for _cls, _pitches in enumerate(DRUM_PITCHES):
    PITCH_TO_CLASS[list(_pitches)] = _cls
PITCH_TO_CLASS.setflags(write=False)

_CLASS_BITS = np.arange(NUM_CLASSES, dtype=np.int64)


def pitch_classes(pitches: np.ndarray) -> np.ndarray:
    """Class index of each MIDI pitch, -1 where the pitch is not in the kit or not a MIDI pitch."""
    pitches = np.asarray(pitches, dtype=np.int64)
    valid = (pitches >= 0) & (pitches < 128)
    return np.where(valid, PITCH_TO_CLASS[np.where(valid, pitches, 0)], -1)


def pitches_to_event(pitches: Iterable[int]) -> int:
    """Event for a set of simultaneous drum pitches; pitches outside the kit are ignored."""
    classes = pitch_classes(np.fromiter(pitches, dtype=np.int64))
    return int(np.bitwise_or.reduce(np.left_shift(1, classes[classes >= 0]), initial=0))


def check_events(events: np.ndarray) -> np.ndarray:
    """Return `events` as int64, or raise ValueError if any is outside 0..NUM_EVENTS-1."""
    events = np.asarray(events)
    if events.size and not np.issubdtype(events.dtype, np.integer):
        raise ValueError(f"drum events must be integers, got dtype {events.dtype}")
    events = events.astype(np.int64, copy=False)
    bad = (events < 0) | (events >= NUM_EVENTS)
    if bad.any():
        raise ValueError(
            f"drum event {int(events[bad][0])} out of range: events are 0..{NUM_EVENTS - 1} "
            f"(one bit per drum class)"
        )
    return events


def event_to_pitches(event: int) -> list[int]:
    """Pitches to write for one event: the first pitch of each class struck, in class order."""
    if isinstance(event, bool) or not isinstance(event, (int, np.integer)):
        raise ValueError(f"drum event must be an integer, got {event!r}")
    check_events(np.asarray([event]))
    return [DRUM_PITCHES[c][0] for c in range(NUM_CLASSES) if (int(event) >> c) & 1]


def events_to_hits(events: np.ndarray) -> np.ndarray:
    """Boolean `[steps, NUM_CLASSES]` matrix of which classes each event strikes."""
    events = check_events(events)
    return ((events[..., None] >> _CLASS_BITS) & 1).astype(bool)


def hits_to_events(hits: np.ndarray) -> np.ndarray:
    """Inverse of `events_to_hits`: int64 events from a boolean `[..., NUM_CLASSES]` matrix."""
    hits = np.asarray(hits, dtype=bool)
    if hits.shape[-1:] != (NUM_CLASSES,):
        raise ValueError(f"hits must have a last axis of {NUM_CLASSES} classes, got shape {hits.shape}")
    return (hits.astype(np.int64) << _CLASS_BITS).sum(axis=-1)


def parse_drum_steps(text: str) -> np.ndarray:
    """Events from Magenta's `--primer_drums` syntax: a list of one tuple of MIDI pitches per step,
    e.g. "[(36,),(),(42,)]" (kick, silence, closed hi-hat).

    Read with `ast.literal_eval` (a literal, never code); raises ValueError saying what is wrong:
    not a list of tuples, an empty list, or a pitch that is not a General MIDI drum kit pitch.
    """
    import ast

    try:
        steps = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        raise ValueError(f"{text!r} is not a Python list literal like \"[(36,),(),(42,)]\"") from None
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"{text!r} must be a non-empty list with one tuple of MIDI pitches per step, "
                         f"like \"[(36,),(),(42,)]\"")
    events = []
    for index, step in enumerate(steps):
        if not isinstance(step, tuple):
            raise ValueError(f"step {index} is {step!r}, not a tuple of MIDI pitches (write (36,) for one pitch)")
        for pitch in step:
            in_kit = isinstance(pitch, int) and not isinstance(pitch, bool) and 0 <= pitch < 128
            if not in_kit or PITCH_TO_CLASS[pitch] < 0:
                raise ValueError(f"step {index}: {pitch!r} is not a General MIDI drum kit pitch "
                                 f"(e.g. 36 kick, 38 snare, 42 closed hi-hat)")
        events.append(pitches_to_event(step))
    return np.asarray(events, dtype=np.int64)
