"""Drum MIDI in and out: files to quantized event arrays, event arrays to MIDI files and piano rolls.

Reading follows Magenta's drum track extraction: drum-channel notes with velocity > 0, onsets
rounded to the nearest step, the sequence starting at the bar of the first hit and padded to
the end of its last bar. Quantization works in ticks, so tempo changes do not matter; the
meter does, and only meters whose bar is four quarter notes long (4/4, 2/2) are accepted.
"""

from __future__ import annotations

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


def read_drum_events(path: str | Path, steps_per_quarter: int = STEPS_PER_QUARTER) -> np.ndarray:
    """Quantized drum events (int64, one per step) of the drum tracks of a MIDI file.

    All drum tracks (channel 10) are merged; notes at pitches outside the kit are ignored.
    The result starts at the bar holding the first hit and its length is whole bars.
    Raises DrumFileError for anything that is not a usable 4/4 drum file.
    """
    if steps_per_quarter < 1:
        raise ValueError(f"steps_per_quarter must be a positive integer, got {steps_per_quarter}")
    score = _load_score(path)
    ticks, classes = _drum_hits(score, path)
    tpq = score.ticks_per_quarter
    # Nearest step, halves rounded up, in exact integer arithmetic.
    steps = (ticks * (2 * steps_per_quarter) + tpq) // (2 * tpq)
    _check_meter(score, path, int(ticks.max()))
    steps_per_bar = QUARTERS_PER_BAR * steps_per_quarter
    start = int(steps.min()) // steps_per_bar * steps_per_bar
    num_bars = (int(steps.max()) - start) // steps_per_bar + 1
    if num_bars > MAX_BARS:  # a corrupt tick would otherwise allocate gigabytes
        raise DrumFileError(path, f"drum part spans {num_bars} bars, more than the {MAX_BARS} we accept")
    events = np.zeros(num_bars * steps_per_bar, dtype=np.int64)
    np.bitwise_or.at(events, steps - start, np.left_shift(1, classes))
    return events


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


def _check_meter(score: ScoreTick, path: str | Path, last_tick: int) -> None:
    """Reject a file whose meter, anywhere up to its last hit, is not four quarters per bar.

    No time signature means 4/4 (as in MIDI and Magenta). A signature replaced at the same tick
    never takes effect, and one that starts after the last hit does not affect the drums.
    """
    signatures = sorted(score.time_signatures, key=lambda ts: ts.time)
    for i, here in enumerate(signatures):
        if i + 1 < len(signatures) and signatures[i + 1].time == here.time:
            continue
        if here.time > last_tick:
            break
        # A bar lasts numerator * 4 / denominator quarter notes.
        if here.numerator * 4 != QUARTERS_PER_BAR * here.denominator or here.denominator == 0:
            raise DrumFileError(
                path,
                f"time signature {here.numerator}/{here.denominator} at tick {here.time}: only meters "
                f"with four quarter notes per bar (4/4, 2/2) are supported",
            )


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
