"""Specification of drum MIDI reading and writing, on real files written with mido."""

import matplotlib.image
import mido
import numpy as np
import pytest
import symusic

from solver.drums.midi import DrumFileError, read_drum_events, read_drum_track, save_piano_roll, write_drum_midi

TPQ = 480
STEP = TPQ // 4  # ticks per 16th note
KICK, SNARE, HAT, CRASH = 36, 38, 42, 49

# Two bars of a rock beat: kick on 1 and 3, snare on 2 and 4, 8th-note hi-hats, a crash to open.
ROCK_BAR = {0: 1 + 4, 2: 4, 4: 2 + 4, 6: 4, 8: 1 + 4, 10: 4, 12: 2 + 4, 14: 4}
ROCK_EVENTS = [ROCK_BAR.get(s % 16, 0) for s in range(32)]
ROCK_EVENTS[0] += 128
ROCK_NOTES = [
    (bar * 16 * STEP + step * STEP, pitch)
    for bar in range(2)
    for step, event in ROCK_BAR.items()
    for pitch, bit in ((KICK, 1), (SNARE, 2), (HAT, 4))
    if event & bit
] + [(0, CRASH)]


def write_mido(path, notes, *, tpq=TPQ, channel=9, meta=(), other_tracks=()):
    """A type-1 MIDI file: a conductor track with `meta` (tick, message) and one note track.

    `notes` are (tick, pitch) or (tick, pitch, velocity) on `channel`, each 30 ticks long;
    `other_tracks` are extra note lists as (channel, notes).
    """
    mid = mido.MidiFile(type=1, ticks_per_beat=tpq)
    mid.tracks.append(_track(sorted(meta, key=lambda m: m[0])))
    for chan, track_notes in ((channel, notes), *other_tracks):
        timed = []
        for note in track_notes:
            tick, pitch, velocity = (*note, 100)[:3]
            timed.append((tick, mido.Message("note_on", channel=chan, note=pitch, velocity=velocity)))
            timed.append((tick + 30, mido.Message("note_off", channel=chan, note=pitch, velocity=0)))
        mid.tracks.append(_track(sorted(timed, key=lambda m: (m[0], m[1].type == "note_on"))))
    mid.save(path)
    return path


def _track(timed):
    track, now = mido.MidiTrack(), 0
    for tick, message in timed:
        track.append(message.copy(time=tick - now))
        now = tick
    return track


def time_signature(tick, numerator, denominator):
    return tick, mido.MetaMessage("time_signature", numerator=numerator, denominator=denominator)


def tempo(tick, bpm):
    return tick, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))


def test_rock_beat_reads_as_expected_events(tmp_path):
    path = write_mido(tmp_path / "rock.mid", ROCK_NOTES, meta=[time_signature(0, 4, 4), tempo(0, 100)])
    events = read_drum_events(path)
    assert events.dtype == np.int64
    assert events.tolist() == ROCK_EVENTS


def test_written_file_reads_back_the_same_events(tmp_path):
    path = tmp_path / "out.mid"
    write_drum_midi(np.array(ROCK_EVENTS), path)
    assert read_drum_events(path).tolist() == ROCK_EVENTS


def test_written_file_is_standard_midi_on_the_drum_channel(tmp_path):
    path = tmp_path / "out.mid"
    write_drum_midi(np.array(ROCK_EVENTS), path, qpm=90.0, velocity=80)
    mid = mido.MidiFile(path)
    ons = [m for track in mid.tracks for m in track if m.type == "note_on" and m.velocity > 0]
    assert {m.channel for m in ons} == {9}
    assert {m.velocity for m in ons} == {80}
    assert sorted({m.note for m in ons}) == [KICK, SNARE, HAT, CRASH]
    assert len(ons) == len(ROCK_NOTES)
    tempos = [m.tempo for track in mid.tracks for m in track if m.type == "set_tempo"]
    assert tempos == [mido.bpm2tempo(90)]
    (drums,) = symusic.Score(str(path)).tracks
    assert drums.is_drum
    notes = drums.notes.numpy()
    assert set(notes["duration"] * 4 // mid.ticks_per_beat) == {1}  # one step each


def test_unknown_pitches_and_melodic_tracks_are_ignored(tmp_path):
    noise = [(tick, 90) for tick, _ in ROCK_NOTES] + [(3 * STEP, 21), (5 * STEP, 127)]
    piano = (0, [(0, KICK), (5 * STEP, SNARE)])  # drum pitches on a melodic channel
    path = write_mido(tmp_path / "noisy.mid", ROCK_NOTES + noise, other_tracks=[piano])
    assert read_drum_events(path).tolist() == ROCK_EVENTS


def test_secondary_pitches_map_to_their_class(tmp_path):
    path = write_mido(tmp_path / "gm2.mid", [(0, 35), (STEP, 40), (2 * STEP, 44), (3 * STEP, 52)])
    assert read_drum_events(path)[:4].tolist() == [1, 2, 4, 128]


def test_onsets_round_to_the_nearest_step(tmp_path):
    off_grid = [(0 + 10, KICK), (4 * STEP - 40, SNARE), (8 * STEP + 59, HAT), (12 * STEP + 60, HAT)]
    events = read_drum_events(write_mido(tmp_path / "swing.mid", off_grid))
    expected = [0] * 16
    expected[0], expected[4], expected[8], expected[13] = 1, 2, 4, 4  # a half step rounds up
    assert events.tolist() == expected


def test_quantization_uses_the_files_ticks_per_quarter(tmp_path):
    notes = [(0, KICK), (24, HAT), (48, SNARE), (95, HAT)]  # 96 ticks per quarter: 24 per step
    events = read_drum_events(write_mido(tmp_path / "tpq96.mid", notes, tpq=96))
    assert events[:5].tolist() == [1, 4, 2, 0, 4]


def test_simultaneous_notes_at_one_step_merge_into_one_event(tmp_path):
    path = write_mido(tmp_path / "flam.mid", [(0, KICK), (5, SNARE), (STEP // 2 - 1, HAT)])
    assert read_drum_events(path)[0] == 1 + 2 + 4


def test_sequence_starts_at_the_bar_of_the_first_hit_and_ends_on_a_bar(tmp_path):
    first = (2 * 16 + 5) * STEP  # bar 3, step 5
    path = write_mido(tmp_path / "late.mid", [(first, KICK), (first + 16 * STEP, SNARE)])
    events = read_drum_events(path)
    assert len(events) == 32
    assert np.nonzero(events)[0].tolist() == [5, 21]


def test_tempo_changes_do_not_move_the_grid(tmp_path):
    meta = [tempo(0, 120), tempo(3 * STEP, 71), tempo(16 * STEP, 180)]
    path = write_mido(tmp_path / "tempo.mid", ROCK_NOTES, meta=meta)
    assert read_drum_events(path).tolist() == ROCK_EVENTS


@pytest.mark.parametrize("numerator, denominator", [(4, 4), (2, 2)])
def test_bars_of_four_quarters_are_accepted(tmp_path, numerator, denominator):
    path = write_mido(tmp_path / "ok.mid", ROCK_NOTES, meta=[time_signature(0, numerator, denominator)])
    assert read_drum_events(path).tolist() == ROCK_EVENTS


@pytest.mark.parametrize("numerator, denominator", [(3, 4), (6, 8), (2, 4)])
def test_other_meters_are_rejected_naming_file_and_meter(tmp_path, numerator, denominator):
    path = write_mido(tmp_path / "waltz.mid", ROCK_NOTES, meta=[time_signature(0, numerator, denominator)])
    with pytest.raises(DrumFileError, match=f"waltz.mid.*{numerator}/{denominator}"):
        read_drum_events(path)


WALTZ_BAR = 12 * STEP  # a 3/4 bar in ticks


def waltz_intro(bars):
    """`bars` bars of 3/4 (kick on 1, hats on 2 and 3) starting at tick 0."""
    return [(bar * WALTZ_BAR + beat * 4 * STEP, KICK if beat == 0 else HAT) for bar in range(bars) for beat in range(3)]


def shifted(notes, ticks):
    return [(tick + ticks, *rest) for tick, *rest in notes]


def test_a_three_four_intro_is_skipped_and_counted_and_the_groove_read(tmp_path):
    intro = 2 * WALTZ_BAR
    meta = [time_signature(0, 3, 4), time_signature(intro, 4, 4)]
    path = write_mido(tmp_path / "intro.mid", waltz_intro(2) + shifted(ROCK_NOTES, intro), meta=meta)
    track = read_drum_track(path)
    assert [s.tolist() for s in track.sections] == [ROCK_EVENTS]
    assert track.skipped_bars == {"time signature 3/4": 2}
    assert read_drum_events(path).tolist() == ROCK_EVENTS


def test_a_bar_in_another_meter_splits_the_file_into_two_sections(tmp_path):
    rock_end, waltz_end = 32 * STEP, 32 * STEP + WALTZ_BAR
    meta = [time_signature(0, 4, 4), time_signature(rock_end, 3, 4), time_signature(waltz_end, 4, 4)]
    notes = ROCK_NOTES + shifted(waltz_intro(1), rock_end) + shifted(ROCK_NOTES, waltz_end)
    track = read_drum_track(write_mido(tmp_path / "middle.mid", notes, meta=meta))
    assert [s.tolist() for s in track.sections] == [ROCK_EVENTS, ROCK_EVENTS]
    assert track.skipped_bars == {"time signature 3/4": 1}


def test_a_change_between_four_four_and_two_two_keeps_one_section(tmp_path):
    meta = [time_signature(0, 4, 4), time_signature(16 * STEP, 2, 2)]
    track = read_drum_track(write_mido(tmp_path / "cut_time.mid", ROCK_NOTES, meta=meta))
    assert [s.tolist() for s in track.sections] == [ROCK_EVENTS] and track.skipped_bars == {}


def test_an_early_downbeat_after_a_meter_change_lands_on_the_new_bar_line(tmp_path):
    intro = WALTZ_BAR
    meta = [time_signature(0, 3, 4), time_signature(intro, 4, 4)]
    groove = [(tick + intro - (10 if tick == 0 else 0), pitch) for tick, pitch in ROCK_NOTES]  # 10 ticks early
    track = read_drum_track(write_mido(tmp_path / "early.mid", waltz_intro(1) + groove, meta=meta))
    assert [s.tolist() for s in track.sections] == [ROCK_EVENTS]


def test_a_file_with_only_other_meters_is_rejected_with_the_bars_it_skipped(tmp_path):
    meta = [time_signature(0, 3, 4), time_signature(3 * WALTZ_BAR, 6, 8)]
    notes = waltz_intro(3) + shifted(waltz_intro(2), 3 * WALTZ_BAR)
    with pytest.raises(DrumFileError, match="waltzes.mid.*3 bars in time signature 3/4, 2 bars in time signature 6/8"):
        read_drum_track(write_mido(tmp_path / "waltzes.mid", notes, meta=meta))


def test_a_multi_track_file_reads_every_drum_track_and_only_those(tmp_path):
    kicks = [(tick, pitch) for tick, pitch in ROCK_NOTES if pitch == KICK]
    rest = [(tick, pitch) for tick, pitch in ROCK_NOTES if pitch != KICK]
    bass = (1, [(tick, 40) for tick, _ in kicks])  # E1 on the bass channel: pitch 40 is a snare on drums
    keys = (0, [(bar * 16 * STEP, 60) for bar in range(2)])
    path = write_mido(tmp_path / "band.mid", kicks, other_tracks=[bass, keys, (9, rest)], meta=[tempo(0, 96)])
    assert len(mido.MidiFile(path).tracks) == 5
    assert read_drum_events(path).tolist() == ROCK_EVENTS


def test_a_meter_after_the_last_hit_or_replaced_at_once_is_harmless(tmp_path):
    meta = [time_signature(0, 3, 4), time_signature(0, 4, 4), time_signature(40 * STEP, 3, 4)]
    path = write_mido(tmp_path / "tail.mid", ROCK_NOTES, meta=meta)
    assert read_drum_events(path).tolist() == ROCK_EVENTS


def test_file_without_drum_track_is_rejected(tmp_path):
    path = write_mido(tmp_path / "piano.mid", [(0, 60), (STEP, 64)], channel=0)
    with pytest.raises(DrumFileError, match="piano.mid.*no drum track"):
        read_drum_events(path)


def test_drum_track_without_kit_notes_is_rejected(tmp_path):
    path = write_mido(tmp_path / "odd.mid", [(0, 21), (STEP, 100)])
    with pytest.raises(DrumFileError, match="odd.mid.*no drum notes"):
        read_drum_events(path)


def test_text_file_named_mid_is_rejected(tmp_path):
    path = tmp_path / "notes.mid"
    path.write_text("this is a shopping list, not a MIDI file\n")
    with pytest.raises(DrumFileError, match="notes.mid.*not a readable MIDI file"):
        read_drum_events(path)


@pytest.mark.parametrize("keep", [0, 10, 30, 60])
def test_truncated_file_is_rejected(tmp_path, keep):
    whole = write_mido(tmp_path / "whole.mid", ROCK_NOTES).read_bytes()
    path = tmp_path / "cut.mid"
    path.write_bytes(whole[:keep])
    with pytest.raises(DrumFileError, match="cut.mid"):
        read_drum_events(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(DrumFileError, match="absent.mid"):
        read_drum_events(tmp_path / "absent.mid")


def test_drum_file_error_is_a_value_error_with_path_and_reason(tmp_path):
    error = DrumFileError(tmp_path / "x.mid", "no drum track")
    assert isinstance(error, ValueError)
    assert error.path == tmp_path / "x.mid"
    assert error.reason == "no drum track"
    assert str(error) == f"{tmp_path / 'x.mid'}: no drum track"


def test_writing_rejects_events_outside_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="512"):
        write_drum_midi(np.array([0, 512]), tmp_path / "bad.mid")


@pytest.mark.parametrize("events", [ROCK_EVENTS * 4, [], [0] * 16])
def test_piano_roll_is_a_png(tmp_path, events):
    path = tmp_path / "roll.png"
    save_piano_roll(np.array(events, dtype=np.int64), path, title="rock")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_implausibly_long_file_is_rejected(tmp_path):
    path = write_mido(tmp_path / "stray.mid", [(0, KICK), (20_000 * 16 * STEP, KICK)])
    with pytest.raises(DrumFileError, match="stray.mid.*bars"):
        read_drum_events(path)
