"""Real-looking drum MIDI files for the drum tests, written with mido as a DAW would export them."""

import mido
import numpy as np
import pytest


def write_band_song(path, intro_bars, groove_bars, seed=0):
    """A type-1 song as a DAW exports it: a 3/4 intro then a 4/4 groove, a tempo change, and
    bass and keys tracks beside two drum tracks (kick alone on one, the kit on the other)."""
    tpq, step = 480, 120
    rng = np.random.default_rng(seed)
    intro = intro_bars * 12 * step
    mid = mido.MidiFile(type=1, ticks_per_beat=tpq)
    conductor = [(0, mido.MetaMessage("time_signature", numerator=3, denominator=4)),
                 (0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(92))),
                 (intro, mido.MetaMessage("time_signature", numerator=4, denominator=4)),
                 (intro + 4 * 16 * step, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(104)))]
    waltz = [(bar * 12 * step + beat * 4 * step, 36 if beat == 0 else 42)
             for bar in range(intro_bars) for beat in range(3)]
    kicks, kit = [], list(waltz)
    for bar in range(groove_bars):
        for s in range(16):
            tick = intro + (bar * 16 + s) * step + int(rng.integers(-12, 13)) * (s > 0)  # humanized
            if s % 8 == 0 or (s == 10 and rng.random() < 0.5):
                kicks.append((tick, 36))
            if s % 8 == 4:
                kit.append((tick, 38))
            if s % 2 == 0:
                kit.append((tick, 42))
    bass = [(t, 40) for t, _ in kicks]  # on channel 2: never read as a snare
    keys = [(intro + bar * 16 * step, 60) for bar in range(groove_bars)]
    mid.tracks.append(_track(conductor))
    for channel, notes in ((9, kicks), (2, bass), (0, keys), (9, kit)):
        timed = []
        for tick, pitch in notes:
            timed += [(tick, mido.Message("note_on", channel=channel, note=pitch, velocity=int(rng.integers(60, 120)))),
                      (tick + 60, mido.Message("note_off", channel=channel, note=pitch, velocity=0))]
        mid.tracks.append(_track(sorted(timed, key=lambda m: (m[0], m[1].type == "note_on"))))
    path.parent.mkdir(parents=True, exist_ok=True)
    mid.save(path)
    return path


def _track(timed: list) -> mido.MidiTrack:
    track, now = mido.MidiTrack(), 0
    for tick, message in sorted(timed, key=lambda m: m[0]):
        track.append(message.copy(time=tick - now))
        now = tick
    return track



@pytest.fixture(scope="session")
def band_song():
    """`band_song(path, intro_bars, groove_bars, seed=0)` writes a type-1 song (see write_band_song)."""
    return write_band_song
