"""Write a small, messy, real-looking drum collection: a few songs as a musician would have them.

No real drum MIDI files can be downloaded here, so this script stands in for "my own folder":
seven songs in grooves the bundled corpus does not have (half-time with hi-hat rolls, a
breakbeat, disco, two-step drum and bass, a metal double kick, a motorik beat, a Latin
songo-like groove), each 36-60 bars of verse / chorus sections with variation bars, fills and
crashes, played loosely (onsets within +-25 ticks of 120 per step, velocities that drift).
They are saved as type-1 files with bass and keys tracks beside the drums, some with a 3/4
intro or a tempo change, in the Groove MIDI Dataset's folder layout
(drummer/session/<n>_<style>_<bpm>_beat_4-4.mid). Deterministic from --seed::

    python scripts/make_small_drum_set.py --out /tmp/my_drums
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mido
import numpy as np

TPQ, STEP = 480, 120
KICK, SNARE, RIM, HAT, PEDAL, OPEN, RIDE, CRASH, TOM_HI, TOM_MID, TOM_LOW = 36, 38, 37, 42, 44, 46, 51, 49, 50, 47, 43
# Grooves, one bar each: instrument -> 16 characters ('X' accent, 'x' hit, 'g' ghost, '.' rest).
GROOVES = {
    "halftime": {KICK: "x......x..x.....", SNARE: "........X.......", HAT: "x.x.x.xxx.x.xxxx"},
    "breakbeat": {KICK: "x.x.......xx....", SNARE: "....X..g.g..X..g", HAT: "x.x.x.x.x.x.x.x."},
    "disco": {KICK: "x...x...x...x...", SNARE: "....X.......X...", HAT: "x...x...x...x...", OPEN: "..x...x...x...x."},
    "dnb": {KICK: "x.........x.....", SNARE: "....X.......X...", RIDE: "x.x.x.x.x.x.x.x."},
    "metal": {KICK: "xxxxxxxxxxxxxxxx", SNARE: "....X.......X...", CRASH: "x...x...x...x..."},
    "motorik": {KICK: "x.x...x.x.x...x.", SNARE: "....X.......X...", HAT: "xxxxxxxxxxxxxxxx"},
    "songo": {KICK: "...x..x....x..x.", RIM: "..x..x....x..x..", HAT: "x.x.x.x.x.x.x.x.", TOM_LOW: ".......x.......x"},
}
LEVELS = {"X": 115, "x": 90, "g": 40}
SONGS = (  # (folder, style, bpm, bars, 3/4 intro bars, tempo change at bar or 0)
    ("drummer1/session1", "halftime", 72, 48, 0, 0),
    ("drummer1/session1", "breakbeat", 96, 40, 2, 0),
    ("drummer1/session2", "disco", 118, 56, 0, 24),
    ("drummer2/session1", "dnb", 172, 60, 0, 0),
    ("drummer2/session1", "metal", 150, 36, 4, 16),
    ("drummer3/session1", "motorik", 126, 52, 0, 0),
    ("drummer3/session2", "songo", 104, 44, 2, 28),
)


def bar_hits(groove: dict[int, str], rng: np.random.Generator, vary: bool) -> list[tuple[int, int, int]]:
    """(step, pitch, velocity) of one bar of the groove, with a few hits moved when `vary`."""
    hits = [(step, pitch, LEVELS[ch]) for pitch, pattern in groove.items()
            for step, ch in enumerate(pattern) if ch != "."]
    if vary:
        extra = [(int(rng.integers(0, 16)), int(rng.choice([KICK, SNARE])), 60) for _ in range(2)]
        hits = [h for h in hits if rng.random() > 0.1] + extra
    return hits


def fill_hits(rng: np.random.Generator, steps: int) -> list[tuple[int, int, int]]:
    """A fill over the last `steps` sixteenths of a bar: snare and toms down the kit."""
    toms = [SNARE, TOM_HI, TOM_MID, TOM_LOW]
    start = 16 - steps
    return [(s, toms[min(3, (s - start) * 4 // steps)], int(rng.integers(80, 120)))
            for s in range(start, 16) if rng.random() < 0.85]


def song_bars(style: str, num_bars: int, rng: np.random.Generator) -> list[list[tuple[int, int, int]]]:
    """Sections of 8 bars: a crash on each section's first bar, a fill on its last, variations."""
    groove = GROOVES[style]
    bars = []
    for bar in range(num_bars):
        hits = bar_hits(groove, rng, vary=rng.random() < 0.2)
        if bar % 8 == 7:
            fill = fill_hits(rng, int(rng.choice([4, 8])))
            hits = [h for h in hits if h[0] < 16 - len({s for s, _, _ in fill})] + fill
        if bar % 8 == 0:
            hits.append((0, CRASH, 110))
        bars.append(hits)
    return bars


def write_song(path: Path, style: str, bpm: int, num_bars: int, intro_bars: int, tempo_bar: int,
               rng: np.random.Generator) -> None:
    """A type-1 file: conductor (meters, tempi), drums, bass and keys on their own channels."""
    intro = intro_bars * 12 * STEP
    conductor = [(0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm)))]
    if intro_bars:
        conductor += [(0, mido.MetaMessage("time_signature", numerator=3, denominator=4)),
                      (intro, mido.MetaMessage("time_signature", numerator=4, denominator=4))]
    else:
        conductor.append((0, mido.MetaMessage("time_signature", numerator=4, denominator=4)))
    if tempo_bar:
        conductor.append((intro + tempo_bar * 16 * STEP, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm + 6))))
    drums = [(b * 12 * STEP + beat * 4 * STEP, RIDE if beat else KICK, 80)
             for b in range(intro_bars) for beat in range(3)]
    drift = 0.0
    for index, hits in enumerate(song_bars(style, num_bars, rng)):
        drift = 0.9 * drift + rng.normal(0, 4)  # velocity drifts as a player's does
        for step, pitch, velocity in hits:
            tick = intro + (index * 16 + step) * STEP + int(np.clip(rng.normal(0, 10), -25, 25))
            drums.append((max(tick, 0), pitch, int(np.clip(velocity + drift + rng.normal(0, 6), 1, 127))))
    bass = [(intro + (b * 16 + s) * STEP, 40 + (b % 4) * 2, 90) for b in range(num_bars) for s in (0, 6, 10)]
    keys = [(intro + b * 16 * STEP, 60 + (b % 3), 70) for b in range(num_bars)]
    mid = mido.MidiFile(type=1, ticks_per_beat=TPQ)
    mid.tracks.append(_track([(t, m) for t, m in conductor]))
    for channel, notes in ((9, drums), (1, bass), (0, keys)):
        timed = []
        for tick, pitch, velocity in notes:
            timed += [(tick, mido.Message("note_on", channel=channel, note=pitch, velocity=velocity)),
                      (tick + 60, mido.Message("note_off", channel=channel, note=pitch, velocity=0))]
        mid.tracks.append(_track(timed))
    path.parent.mkdir(parents=True, exist_ok=True)
    mid.save(path)


def _track(timed: list[tuple[int, mido.Message]]) -> mido.MidiTrack:
    track, now = mido.MidiTrack(), 0
    for tick, message in sorted(timed, key=lambda m: (m[0], m[1].type == "note_on")):
        track.append(message.copy(time=tick - now))
        now = tick
    return track


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for index, (folder, style, bpm, bars, intro, tempo_bar) in enumerate(SONGS, start=1):
        path = args.out / folder / f"{index}_{style}_{bpm}_beat_4-4.mid"
        write_song(path, style, bpm, bars, intro, tempo_bar, np.random.default_rng([args.seed, index]))
        print(path)


if __name__ == "__main__":
    main()
