"""Generate the synthetic drum MIDI corpus bundled in ``data/drums``.

The drum RNN recipe needs default training data that anyone can ship and regenerate. This script
writes it: General MIDI drum files in several styles (rock, funk, shuffle, ...), each a groove
arranged in 4- or 8-bar sections with fills, crashes, variation bars, ride sections, accents,
ghost notes and slightly humanised timing and velocity. Grooves are written as 16-step strings,
one character per sixteenth, so a reader sees the pattern as a drummer would.

File ``i`` depends only on ``(seed, i)``: its random generator is ``np.random.default_rng([seed, i])``
and its style is ``STYLES[i % len(STYLES)]``. Any file can thus be regenerated on its own, and the
defaults reproduce the committed corpus byte for byte::

    python scripts/make_drum_corpus.py --seed 1234 --num-files 360 --out data/drums
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import mido
import numpy as np

DEFAULT_SEED = 1234
DEFAULT_NUM_FILES = 360
DEFAULT_OUT = "data/drums"

TICKS_PER_BEAT = 480
STEPS_PER_BAR = 16
TICKS_PER_STEP = TICKS_PER_BEAT // 4
# Short enough that a repeated hit on the next sixteenth never overlaps, even with jitter.
NOTE_TICKS = 90
# Onset humanisation: a few ticks, far below half a step (60), so quantising recovers the grid.
JITTER_STD_TICKS = 3.0
MAX_JITTER_TICKS = 8
VELOCITY_STD = 5.0

# Pattern characters: accent, normal, soft, ghost; '.' is a rest.
LEVELS = {"X": 112, "x": 92, "o": 70, "g": 38}

# General MIDI drum pitches, grouped as in Magenta's drum_kit classes.
SIDE_STICK, CLOSED_HAT, PEDAL_HAT, OPEN_HAT = 37, 42, 44, 46
RIDE, RIDE_BELL = 51, 53
HIGH_TOM, LOW_TOM, FLOOR_TOM = 50, 45, 43
TIME_PITCHES = (CLOSED_HAT, OPEN_HAT, RIDE, RIDE_BELL)
PEDAL_PATTERN = "....x.......x..."

Bar = dict[tuple[int, int], int]
"""One bar of hits: ``(step, pitch) -> velocity`` before humanisation."""


@dataclass(frozen=True)
class Style:
    """A family of grooves: alternatives for each part, a tempo range and how it is played.

    Patterns are 16 characters (one bar) or 32 (a two-bar phrase). ``backbeat_pitch`` replaces the
    snare in the groove (side stick in bossa nova and reggae); fills always use the real snare.
    """

    name: str
    tempo: tuple[int, int]
    kick: tuple[str, ...]
    snare: tuple[str, ...]
    time: tuple[str, ...]
    open_hat: tuple[str, ...] = ("",)
    backbeat_pitch: int | None = None
    ride_prob: float = 0.2
    pedal_prob: float = 0.5
    swing: bool = False
    variation_prob: float = 0.15


# A pattern listed twice is twice as likely to be a song's groove.
STYLES: tuple[Style, ...] = (
    Style(
        name="rock",
        tempo=(96, 136),
        kick=(
            "x.......x.......",
            "x.......x.x.....",
            "x......xx.......",
            "x.x.....x.x.....",
            "x.....x.x.......",
        ),
        snare=("....X.......X...", "....X.......X...", "....X.......X..o"),
        time=("X.x.X.x.X.x.X.x.", "x.x.x.x.x.x.x.x.", "X.x.X.x.X.x.X.xx"),
        open_hat=("", "", "..............x."),
        ride_prob=0.25,
    ),
    Style(
        name="funk",
        tempo=(88, 112),
        kick=("x.....x...x.....", "x..x..x...x..x..", "x.x....x..x.....", "x......x.x....x."),
        snare=("....X..g.g..X..g", "....X...g..gX.g.", ".g..X..g.g.gX...", "....X.gg....X..g"),
        time=("XoxoXoxoXoxoXoxo", "xoxoxoxoxoxoxoxo", "X.x.XoxoX.x.Xoxo"),
        open_hat=("", "......x.......x.", "..............x."),
        ride_prob=0.1,
    ),
    Style(
        name="shuffle",
        tempo=(100, 140),
        # Swung eighths on a sixteenth grid: the offbeat eighth falls on the fourth sixteenth.
        kick=("x.......x.......", "x..x....x..x....", "x.......x..x...."),
        snare=("....X.......X...", "....X..g....X..g", "...gX......gX..."),
        time=("X..xX..xX..xX..x", "x..xx..xx..xx..x"),
        ride_prob=0.4,
        swing=True,
    ),
    Style(
        name="bossa",
        tempo=(120, 150),
        kick=("x..xx..xx..xx..x", "x.....x.x.....x."),
        snare=("x..x..x...x..x..", "x..x..x...x..x....x..x...x..x..."),
        time=("x.x.x.x.x.x.x.x.", "xoxoxoxoxoxoxoxo"),
        backbeat_pitch=SIDE_STICK,
        ride_prob=0.3,
        variation_prob=0.08,
    ),
    Style(
        name="halftime",
        tempo=(130, 160),
        kick=("x.........x.....", "x......x..x.....", "x.....x...x..x..", "x.x.......x....x"),
        snare=("........X.......", "........X......g", "...g....X..g...."),
        time=("X.x.x.x.X.x.x.x.", "XoxoXoxoXoxoXoxo", "X...X...X...X..."),
        open_hat=("", "......x........."),
        ride_prob=0.2,
    ),
    Style(
        name="breakbeat",
        tempo=(88, 136),
        kick=("x.x.......xx....", "x.x...x...x..x..", "x.x.......xx....x.x.......x.....", "x.x....x..x....."),
        snare=("....X..g.g..X..g", "...gX..g.g.gX..g", "....X..g.g..X..g....X..g.gX...X."),
        time=("x.x.x.x.x.x.x.x.", "XoxoXoxoXoxoXoxo"),
        open_hat=("", "......x.......x.", "..............x."),
        ride_prob=0.15,
        variation_prob=0.2,
    ),
    Style(
        name="disco",
        tempo=(112, 128),
        kick=("x...x...x...x...", "x...x...x...x...", "x...x...x...x.x."),
        snare=("....X.......X...", "....X.......X..g", "....X..g....X..."),
        time=("x.x.x.x.x.x.x.x.", "xoxoxoxoxoxoxoxo"),
        open_hat=("..x...x...x...x.",),
        ride_prob=0.05,
    ),
    Style(
        name="reggae",
        tempo=(70, 90),
        kick=("........x.......", "........x.......", "x.......x......."),
        snare=("........x.......", "........x.....g."),
        time=("x.x.x.x.x.x.x.x.", "..x...x...x...x.", "x..xx..xx..xx..x"),
        open_hat=("", "..............x."),
        backbeat_pitch=SIDE_STICK,
        ride_prob=0.1,
        variation_prob=0.1,
    ),
    Style(
        name="jazz",
        tempo=(120, 180),
        kick=("g...g...g...g...", "g...g...g...g...", "g.........o....."),
        snare=("..........g.....", ".......g......g.", "...g......g.....", "................"),
        time=("x...X..xx...X..x", "x...X...x...X..x"),
        ride_prob=1.0,
        pedal_prob=1.0,
        swing=True,
        variation_prob=0.2,
    ),
)

# A fill is a rhythm (one figure per beat) played along a contour of voices.
STRAIGHT_FIGURES = ("xxxx", "x.x.", "x.xx", "xx.x", "xxx.")
SWING_FIGURES = ("x..x", "x..x", "x...", "xx.x")
FILL_CONTOURS = (
    ("snare",),
    ("snare", "high", "mid", "low"),
    ("high", "mid", "low", "floor"),
    ("snare", "snare", "high", "floor"),
    ("snare", "mid", "floor"),
    ("high", "high", "low", "low"),
)


@dataclass(frozen=True)
class Kit:
    """The pitches of one file, as a drummer keeps one kit for a song; fills name them in ``voices``."""

    kick: int
    snare: int
    crash: int
    voices: dict[str, int]


@dataclass(frozen=True)
class Section:
    """How one section of the song is played: which groove, on hats or ride, and how loud."""

    groove: dict[str, str]
    ride: bool
    bell: bool
    pedal: bool
    level: int


Fill = tuple[tuple[int, str, int], ...]
"""Hits ``(step offset, voice, velocity)`` plus a ``kick`` voice for the kick under the fill."""


@dataclass(frozen=True)
class Piece:
    """One generated file: where it goes, its MIDI, and counts for the summary."""

    path: Path
    style: str
    midi: mido.MidiFile
    bars: int
    notes: int


def pattern_hits(pattern: str, bar_index: int) -> list[tuple[int, int]]:
    """The ``(step, velocity)`` hits of a one- or two-bar pattern string in bar ``bar_index``."""
    assert len(pattern) % STEPS_PER_BAR == 0, pattern
    phrase_bars = max(1, len(pattern) // STEPS_PER_BAR)  # "" (no part) counts as one empty bar
    start = (bar_index % phrase_bars) * STEPS_PER_BAR
    bar = pattern[start : start + STEPS_PER_BAR]
    return [(step, LEVELS[c]) for step, c in enumerate(bar) if c != "."]


def pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """One of ``options``, uniformly."""
    return options[int(rng.integers(len(options)))]


def make_kit(rng: np.random.Generator) -> Kit:
    """A kit mostly on the standard pitches, with the occasional alternative a real file would use."""
    kick = 36 if rng.random() < 0.85 else 35
    snare = 38 if rng.random() < 0.85 else 40
    crash = 49 if rng.random() < 0.8 else 57
    mid_tom = 48 if rng.random() < 0.7 else 47
    voices = {
        "kick": kick,
        "snare": snare,
        "high": HIGH_TOM,
        "mid": mid_tom,
        "low": LOW_TOM,
        "floor": FLOOR_TOM,
    }
    return Kit(kick=kick, snare=snare, crash=crash, voices=voices)


def make_fill(rng: np.random.Generator, style: Style, length: int) -> Fill:
    """A fill of ``length`` steps ending the bar: figures per beat, voices along a contour, crescendo.

    Half the fills repeat one figure for every beat, as drummers often do; some keep the kick on
    the beats underneath.
    """
    figures = SWING_FIGURES if style.swing else STRAIGHT_FIGURES
    beats = length // 4
    same = rng.random() < 0.5
    first = pick(rng, figures)
    rhythm = "".join(first if same else pick(rng, figures) for _ in range(beats))
    steps = [i for i, c in enumerate(rhythm) if c != "."]
    contour = FILL_CONTOURS[int(rng.integers(len(FILL_CONTOURS)))]
    hits = []
    for k, step in enumerate(steps):
        voice = contour[k * len(contour) // len(steps)]
        velocity = int(80 + 35 * k / max(1, len(steps) - 1))
        hits.append((STEPS_PER_BAR - length + step, voice, velocity))
    if rng.random() < 0.4:
        hits += [(STEPS_PER_BAR - length + 4 * b, "kick", LEVELS["x"]) for b in range(beats)]
    return tuple(hits)


def groove_bar(style: Style, kit: Kit, section: Section, bar_index: int) -> Bar:
    """One bar of the section's groove: kick, backbeat, timekeeper (hats or ride), open hats, pedal."""
    bar: Bar = {}
    groove = section.groove
    for step, vel in pattern_hits(groove["kick"], bar_index):
        bar[step, kit.kick] = vel
    for step, vel in pattern_hits(groove["snare"], bar_index):
        bar[step, style.backbeat_pitch or kit.snare] = vel
    for step, vel in pattern_hits(groove["time"], bar_index):
        if section.ride:
            bar[step, RIDE_BELL if section.bell and vel == LEVELS["X"] else RIDE] = vel
        else:
            bar[step, CLOSED_HAT] = vel
    if not section.ride:
        for step, vel in pattern_hits(groove["open"], bar_index):
            bar.pop((step, CLOSED_HAT), None)  # one hi-hat cannot be open and closed at once
            bar[step, OPEN_HAT] = vel
    if section.pedal:
        for step, vel in pattern_hits(PEDAL_PATTERN, bar_index):
            bar[step, PEDAL_HAT] = vel - 20
    return bar


def vary(rng: np.random.Generator, style: Style, kit: Kit, section: Section, bar: Bar) -> None:
    """Turn ``bar`` into a variation bar: another kick pattern, a snare pickup, or an open hat."""
    kind = int(rng.integers(3))
    if kind == 0:
        for key in [k for k in bar if k[1] == kit.kick]:
            del bar[key]
        for step, vel in pattern_hits(pick(rng, style.kick), 0):
            bar[step, kit.kick] = vel
    elif kind == 1:
        bar[STEPS_PER_BAR - 1, kit.snare] = LEVELS["o"]
    elif not section.ride:
        step = 14 if rng.random() < 0.7 else 6
        bar.pop((step, CLOSED_HAT), None)
        bar[step, OPEN_HAT] = LEVELS["x"]


def apply_fill(bar: Bar, fill: Fill, kit: Kit) -> None:
    """Replace the end of ``bar`` with ``fill``; the pedal hat keeps time underneath."""
    start = min(step for step, _, _ in fill)
    for key in [k for k in bar if k[0] >= start and k[1] != PEDAL_HAT]:
        del bar[key]
    for step, voice, vel in fill:
        bar[step, kit.voices[voice]] = vel


def crash(bar: Bar, kit: Kit) -> None:
    """Open a section: crash and kick on the downbeat, in place of the timekeeper."""
    for pitch in TIME_PITCHES:
        bar.pop((0, pitch), None)
    bar[0, kit.crash] = LEVELS["X"]
    bar[0, kit.kick] = LEVELS["X"]


def arrange(rng: np.random.Generator, style: Style, kit: Kit) -> list[Bar]:
    """A whole song: sections in a simple form (AABA, ABAB, ...), fills, crashes and an ending hit.

    Sections are 4 or 8 bars and the song 16 to 48 bars before the final crash. Each section's
    last bar holds a fill (a beat, half a bar or a whole bar) drawn mostly from the file's own
    small palette of fills, so fills recur within a song as they do in real playing.
    """
    section_len = int(rng.choice([4, 8]))
    n_sections = int(rng.integers(16 // section_len, 48 // section_len + 1))
    form = pick(rng, ("AABA", "ABAB", "AAAB", "AABB"))
    parts = ("kick", "snare", "time", "open")
    options = {"kick": style.kick, "snare": style.snare, "time": style.time, "open": style.open_hat}
    grooves = {label: {p: pick(rng, options[p]) for p in parts} for label in "AB"}
    ride = {label: bool(rng.random() < style.ride_prob) for label in "AB"}
    bell = bool(rng.random() < 0.2)
    main_length = int(rng.choice([4, 8, 16], p=[0.4, 0.4, 0.2]))
    palette = {length: [make_fill(rng, style, length) for _ in range(2)] for length in (4, 8, 16)}

    def choose_fill(length: int) -> Fill:
        if rng.random() < 0.85:
            return palette[length][int(rng.integers(2))]
        return make_fill(rng, style, length)

    bars: list[Bar] = []
    for s in range(n_sections):
        label = form[s % len(form)]
        section = Section(
            groove=grooves[label],
            ride=ride[label],
            bell=bell,
            pedal=ride[label] and bool(rng.random() < style.pedal_prob),
            level=int(rng.integers(-8, 9)),
        )
        for b in range(section_len):
            bar = groove_bar(style, kit, section, b)
            if b == section_len - 1:
                length = main_length if rng.random() < 0.7 else int(rng.choice([4, 8, 16]))
                apply_fill(bar, choose_fill(length), kit)
            elif b == 3 and rng.random() < 0.35:
                apply_fill(bar, choose_fill(4), kit)
            elif rng.random() < style.variation_prob:
                vary(rng, style, kit, section, bar)
            if b == 0 and (s > 0 or rng.random() < 0.5):
                crash(bar, kit)
            bars.append({k: v + section.level for k, v in bar.items()})
    ending: Bar = {}
    crash(ending, kit)
    bars.append(ending)
    return bars


def render(rng: np.random.Generator, bars: list[Bar], bpm: int, title: str) -> mido.MidiFile:
    """A type-0 MIDI file of ``bars`` on channel 10, with a 4/4 time signature and the tempo.

    Onsets move by a few ticks and velocities by a few steps, as a human drummer's would.
    """
    events = []
    for b, bar in enumerate(bars):
        for (step, pitch), vel in sorted(bar.items()):
            jitter = int(np.clip(round(rng.normal(0, JITTER_STD_TICKS)), -MAX_JITTER_TICKS, MAX_JITTER_TICKS))
            onset = max(0, (b * STEPS_PER_BAR + step) * TICKS_PER_STEP + jitter)
            velocity = int(np.clip(round(vel + rng.normal(0, VELOCITY_STD)), 1, 127))
            events.append((onset, 1, pitch, velocity))
            events.append((onset + NOTE_TICKS, 0, pitch, 0))
    events.sort()  # at equal ticks, note offs (0) come before note ons (1)

    track = mido.MidiTrack()
    track.append(mido.MetaMessage("track_name", name=title, time=0))
    track.append(mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0))
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm), time=0))
    now = 0
    for tick, is_on, pitch, velocity in events:
        kind = "note_on" if is_on else "note_off"
        track.append(mido.Message(kind, channel=9, note=pitch, velocity=velocity, time=tick - now))
        now = tick
    midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    return midi


def generate(index: int, seed: int = DEFAULT_SEED) -> Piece:
    """File ``index`` of the corpus; it depends only on ``seed`` and ``index``."""
    rng = np.random.default_rng([seed, index])
    style = STYLES[index % len(STYLES)]
    number = index // len(STYLES)
    kit = make_kit(rng)
    bpm = int(rng.integers(style.tempo[0], style.tempo[1] + 1))
    bars = arrange(rng, style, kit)
    name = f"{style.name}_{number:03d}"
    midi = render(rng, bars, bpm, name)
    notes = sum(len(bar) for bar in bars)
    return Piece(Path(style.name) / f"{name}.mid", style.name, midi, len(bars), notes)


def write_piece(piece: Piece, out: Path) -> Path:
    """Save ``piece`` under ``out`` and return its path."""
    path = out / piece.path
    path.parent.mkdir(parents=True, exist_ok=True)
    piece.midi.save(path)
    return path


def summarise(pieces: list[Piece]) -> dict[str, tuple[int, int, int]]:
    """Files, bars and notes per style, in the order of ``STYLES``."""
    table = {}
    for style in STYLES:
        mine = [p for p in pieces if p.style == style.name]
        if mine:
            table[style.name] = (len(mine), sum(p.bars for p in mine), sum(p.notes for p in mine))
    return table


def readme(table: dict[str, tuple[int, int, int]], size_bytes: int, seed: int, num_files: int) -> str:
    """The corpus README: what it is, how it was made, its size and licence."""
    files, bars, notes = (sum(row[i] for row in table.values()) for i in range(3))
    rows = "\n".join(f"| {name} | {f} | {b} | {n} |" for name, (f, b, n) in table.items())
    return f"""# Drum corpus

Synthetic drum grooves in General MIDI, the default training data of the drum RNN recipe.

Every file is one song in one style: a groove arranged in sections of 4 or 8 bars, with a fill
(snare and tom runs) closing each section, a crash opening the next, occasional variation bars,
ride sections, accents, ghost notes and slightly humanised timing (a few ticks) and velocity.
Files are type-0 MIDI at {TICKS_PER_BEAT} ticks per quarter, in 4/4 with a tempo message, and hold
one drum track on channel 10 using the General MIDI pitches of Magenta's drum classes.

The corpus is synthetic: no recording or third-party file went into it. It was generated by

    python scripts/make_drum_corpus.py --seed {seed} --num-files {num_files} --out data/drums

which rebuilds it byte for byte (file `i` depends only on the seed and `i`).

## Size

{files} files, {bars} bars, {notes} notes, {len(table)} styles, {size_bytes / 1e6:.2f} MB of MIDI.

| style | files | bars | notes |
|---|---|---|---|
{rows}

## Licence

Made by the solver project; free to use, modify and redistribute for any purpose, without
conditions (CC0 1.0 / public domain dedication).
"""


def write_corpus(out: Path, num_files: int, seed: int) -> list[Piece]:
    """Write ``num_files`` files and the README under ``out``, replacing earlier generated files."""
    for style in STYLES:
        for old in (out / style.name).glob(f"{style.name}_*.mid"):
            old.unlink()
    pieces = [generate(i, seed) for i in range(num_files)]
    size = sum(write_piece(p, out).stat().st_size for p in pieces)
    (out / "README.md").write_text(readme(summarise(pieces), size, seed, num_files))
    return pieces


def main() -> None:
    """Command line: generate the corpus and print files, bars and notes per style."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed")
    parser.add_argument("--num-files", type=int, default=DEFAULT_NUM_FILES, help="number of files")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    args = parser.parse_args()
    if args.num_files < 1:
        parser.error(f"--num-files must be at least 1, got {args.num_files}")
    pieces = write_corpus(args.out, args.num_files, args.seed)
    table = summarise(pieces)
    print(f"{'style':<10} {'files':>6} {'bars':>7} {'notes':>8}")
    for name, (files, bars, notes) in table.items():
        print(f"{name:<10} {files:>6} {bars:>7} {notes:>8}")
    totals = [sum(row[i] for row in table.values()) for i in range(3)]
    print(f"{'total':<10} {totals[0]:>6} {totals[1]:>7} {totals[2]:>8}  -> {args.out}")


if __name__ == "__main__":
    main()
