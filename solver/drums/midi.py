"""Drum MIDI in and out: files to quantized event arrays, event arrays to MIDI files and piano rolls.

Reading follows Magenta's drum track extraction: drum-channel notes with velocity > 0, onsets
rounded to the nearest step, a sequence starting at the bar of the first hit and padded to
the end of its last bar. Quantization works in ticks (beats), so tempo changes do not matter;
the meter does: only stretches whose bar is four quarter notes long (4/4, 2/2) are read, and
the bars of other meters (a 3/4 intro) are counted as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from symusic.core import NoteTickList, ScoreTick, TempoTick, TimeSignatureTick, TrackTick

from .encoding import (
    DRUM_NAMES,
    DRUM_PITCHES,
    NUM_CLASSES,
    STEPS_PER_BAR,
    STEPS_PER_QUARTER,
    check_events,
    events_to_hits,
    pitch_classes,
)

QUARTERS_PER_BAR = 4
DEFAULT_TICKS_PER_QUARTER = 480
MAX_BARS = 10_000  # over five hours at 120 qpm


class DrumFileError(ValueError):
    """A MIDI file that cannot give a drum sequence; the message names the file and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class DrumTrack:
    """What a MIDI file gives: its usable drum sections and the bars it left out, by reason.

    `sections` are the runs of bars of four quarter notes (4/4, 2/2) that hold drum hits, each
    an int64 event array of whole bars from the bar of its first hit to the bar of its last.
    `skipped_bars` counts the bars with drums in other meters, e.g. {'time signature 3/4': 4}.
    """

    sections: list[np.ndarray]
    skipped_bars: dict[str, int] = field(default_factory=dict)
    qpm: float = 120.0  # the tempo where the first section starts (MIDI's default: 120)


def read_drum_track(path: str | Path, steps_per_quarter: int = STEPS_PER_QUARTER) -> DrumTrack:
    """The drum sections of a MIDI file, quantized on its beats (ticks), whatever its tempo map.

    All drum tracks (channel 10) are merged, other tracks and notes outside the kit ignored.
    A time signature change starts a new stretch; stretches whose bar is not four quarter notes
    are skipped and their bars counted. Raises DrumFileError when nothing is usable, naming why.
    """
    if steps_per_quarter < 1:
        raise ValueError(f"steps_per_quarter must be a positive integer, got {steps_per_quarter}")
    score = _load_score(path)
    ticks, classes = _drum_hits(score, path)
    tpq = score.ticks_per_quarter
    starts, meters = _meter_stretches(score)
    # A hit belongs to the stretch of the step it rounds to (an early downbeat is still the downbeat).
    half_step = tpq // (2 * steps_per_quarter)
    owner = np.searchsorted(starts, ticks + half_step, side="right") - 1
    track = DrumTrack(sections=[])
    steps_per_bar = QUARTERS_PER_BAR * steps_per_quarter
    for index in np.unique(owner):
        start, (numerator, denominator) = int(starts[index]), meters[index]
        mine = owner == index
        if numerator * 4 != QUARTERS_PER_BAR * denominator:  # a bar is numerator * 4 / denominator quarters
            bar_ticks = max(1, numerator * 4 * tpq // max(denominator, 1))
            bars = (ticks[mine] - start) // bar_ticks
            reason = f"time signature {numerator}/{denominator}"
            track.skipped_bars[reason] = track.skipped_bars.get(reason, 0) + int(bars.max() - bars.min() + 1)
            continue
        # Nearest step from the stretch's first bar line, halves rounded up, in exact integers.
        steps = ((ticks[mine] - start) * (2 * steps_per_quarter) + tpq) // (2 * tpq)
        first = int(steps.min()) // steps_per_bar * steps_per_bar
        num_bars = (int(steps.max()) - first) // steps_per_bar + 1
        if num_bars > MAX_BARS:  # a corrupt tick would otherwise allocate gigabytes
            raise DrumFileError(path, f"drum part spans {num_bars} bars, more than the {MAX_BARS} we accept")
        events = np.zeros(num_bars * steps_per_bar, dtype=np.int64)
        np.bitwise_or.at(events, steps - first, np.left_shift(1, classes[mine]))
        if not track.sections:
            track.qpm = _tempo_at(score, start + first * tpq // steps_per_quarter)
        track.sections.append(events)
    if not track.sections:
        skipped = ", ".join(f"{bars} bars in {reason}" for reason, bars in track.skipped_bars.items())
        raise DrumFileError(path, f"no drums in a meter of four quarter notes per bar (4/4, 2/2): {skipped}")
    return track


def read_drum_events(path: str | Path, steps_per_quarter: int = STEPS_PER_QUARTER) -> np.ndarray:
    """The events of the first usable drum section of a MIDI file (see `read_drum_track`).

    For a file in 4/4 throughout, that is the whole drum part: from the bar holding the first
    hit to the end of the bar of the last. Raises DrumFileError if the file has no such section.
    """
    return read_drum_track(path, steps_per_quarter).sections[0]


def _tempo_at(score: ScoreTick, tick: int) -> float:
    """Quarter notes per minute in effect at `tick` (120 before the first tempo, as in MIDI)."""
    qpm = 120.0
    for tempo in sorted(score.tempos, key=lambda t: t.time):
        if tempo.time > tick:
            break
        qpm = float(tempo.qpm)
    return qpm if qpm > 0 else 120.0


def _meter_stretches(score: ScoreTick) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Start ticks and (numerator, denominator) of the file's runs of one meter, in order.

    No time signature means 4/4 (as in MIDI and Magenta), also before the first one. A signature
    replaced at the same tick never takes effect; repeating the current meter starts no new run,
    and a change between 4/4 and 2/2 neither (the bar stays four quarter notes long).
    """
    by_tick: dict[int, tuple[int, int]] = {0: (4, 4)}
    for signature in sorted(score.time_signatures, key=lambda ts: ts.time):
        by_tick[max(int(signature.time), 0)] = (int(signature.numerator), int(signature.denominator))
    starts: list[int] = []
    meters: list[tuple[int, int]] = []
    for tick, meter in sorted(by_tick.items()):
        if meters and _bar_quarters(meters[-1]) == _bar_quarters(meter) == QUARTERS_PER_BAR:
            continue
        if meters and meters[-1] == meter:
            continue
        starts.append(tick)
        meters.append(meter)
    return np.asarray(starts, dtype=np.int64), meters


def _bar_quarters(meter: tuple[int, int]) -> float:
    numerator, denominator = meter
    return numerator * 4 / denominator if denominator else float("nan")


def _load_score(path: str | Path) -> ScoreTick:
    """Parse a MIDI file with symusic, turning every parse failure into a DrumFileError."""
    try:
        score = ScoreTick.from_file(str(path))
    except Exception as exc:  # symusic raises RuntimeError/ValueError/... on bad bytes
        raise DrumFileError(path, f"not a readable MIDI file ({exc})") from exc
    if score.ticks_per_quarter <= 0:
        raise DrumFileError(path, f"invalid MIDI header: {score.ticks_per_quarter} ticks per quarter")
    return score


def _drum_hits(score: ScoreTick, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Onset ticks and class indices of the sounding drum notes at kit pitches."""
    drums = [track.notes.numpy() for track in score.tracks if track.is_drum]
    if not drums:
        raise DrumFileError(path, "no drum track (no notes on MIDI channel 10)")
    ticks = np.concatenate([d["time"] for d in drums]).astype(np.int64)
    pitches = np.concatenate([d["pitch"] for d in drums]).astype(np.int64)
    velocities = np.concatenate([d["velocity"] for d in drums]).astype(np.int64)
    classes = pitch_classes(pitches)
    keep = (velocities > 0) & (classes >= 0) & (ticks >= 0)
    if not keep.any():
        raise DrumFileError(path, "no drum notes at General MIDI drum kit pitches")
    return ticks[keep], classes[keep]


def write_drum_midi(
    events: np.ndarray,
    path: str | Path,
    qpm: float = 120.0,
    velocity: int = 100,
    steps_per_quarter: int = STEPS_PER_QUARTER,
    ticks_per_quarter: int = DEFAULT_TICKS_PER_QUARTER,
) -> None:
    """Write events as a one-track 4/4 drum MIDI file (channel 10), each hit one step long.

    Each struck class sounds at its first pitch in DRUM_PITCHES. Reading the file back with
    `read_drum_events` gives the same events, less any silent bars before the first hit.
    """
    hits = events_to_hits(check_events(events))
    if not 1 <= velocity <= 127:
        raise ValueError(f"velocity must be 1..127, got {velocity}")
    if not qpm > 0:
        raise ValueError(f"qpm must be positive, got {qpm}")
    if ticks_per_quarter % steps_per_quarter:
        raise ValueError(
            f"ticks_per_quarter={ticks_per_quarter} must be a multiple of "
            f"steps_per_quarter={steps_per_quarter}"
        )
    step_ticks = ticks_per_quarter // steps_per_quarter
    steps, classes = np.nonzero(hits)
    first_pitch = np.array([pitches[0] for pitches in DRUM_PITCHES], dtype=np.int8)
    track = TrackTick("drums", 0, True)
    track.notes = NoteTickList.from_numpy(
        (steps * step_ticks).astype(np.int32),
        np.full(len(steps), step_ticks, dtype=np.int32),
        first_pitch[classes],
        np.full(len(steps), velocity, dtype=np.int8),
    )
    score = ScoreTick(ticks_per_quarter)
    score.tempos.append(TempoTick(0, qpm=float(qpm)))
    score.time_signatures.append(TimeSignatureTick(0, 4, 4))
    score.tracks.append(track)
    score.dump_midi(str(path))


def save_piano_roll(
    events: np.ndarray, path_png: str | Path, title: str | None = None, steps_per_bar: int = STEPS_PER_BAR
) -> None:
    """Save a PNG of the events: drum classes as rows, steps as columns, a line at every bar.

    Meant for a person to look at a generated pattern without a MIDI player.
    """
    # The object-oriented API renders with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    hits = events_to_hits(check_events(events))
    num_steps = max(len(hits), 1)
    fig = Figure(figsize=(min(2.0 + 0.08 * num_steps, 60.0), 3.2), dpi=100)
    ax = fig.subplots()
    ax.imshow(
        hits.T.astype(float) if len(hits) else np.zeros((NUM_CLASSES, 1)),
        aspect="auto",
        origin="lower",
        cmap="Greys",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        extent=(-0.5, num_steps - 0.5, -0.5, NUM_CLASSES - 0.5),
    )
    for step in range(0, num_steps + 1, max(steps_per_bar // 4, 1)):
        bar_line = step % steps_per_bar == 0
        ax.axvline(step - 0.5, color="tab:red" if bar_line else "0.85", linewidth=1.2 if bar_line else 0.5)
    ax.set_yticks(range(NUM_CLASSES), DRUM_NAMES)
    bar_starts = range(0, num_steps, steps_per_bar)
    ax.set_xticks(list(bar_starts), [str(i + 1) for i in range(len(bar_starts))])
    ax.set_xlabel(f"bar ({steps_per_bar} steps each)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(str(path_png), format="png")
