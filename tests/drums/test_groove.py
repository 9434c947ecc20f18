"""The groove report on hand-written MIDI files whose statistics are counted by hand."""

from __future__ import annotations

import json
import math

import mido
import numpy as np
import pytest

from solver.drums.groove import groove_report, groove_stats, js_divergence, plot_report, report_metrics, write_report
from solver.drums.midi import read_drum_events

KICK, SNARE, HAT, RIDE = 36, 38, 42, 51
ROCK = {KICK: (0, 8), SNARE: (4, 12), HAT: (0, 2, 4, 6, 8, 10, 12, 14)}  # a plain rock beat
FILL = {KICK: (0,), SNARE: tuple(range(8, 16))}  # a kick, then a snare roll in the second half


def write_pattern(path, bars):
    """A 4/4 drum file (channel 10, 480 ticks per quarter) of bars given as {pitch: steps}."""
    step, messages = 120, []
    for index, bar in enumerate(bars):
        for pitch, steps in bar.items():
            for s in steps:
                tick = (index * 16 + s) * step
                messages += [(tick, mido.Message('note_on', channel=9, note=pitch, velocity=100)),
                             (tick + 60, mido.Message('note_off', channel=9, note=pitch, velocity=0))]
    track, now = mido.MidiTrack(), 0
    for tick, message in sorted(messages, key=lambda m: (m[0], m[1].type == 'note_on')):
        track.append(message.copy(time=tick - now))
        now = tick
    song = mido.MidiFile(type=0, ticks_per_beat=480)
    song.tracks.append(track)
    song.save(path)
    return read_drum_events(path)


@pytest.fixture
def rock(tmp_path):
    return write_pattern(tmp_path / 'rock.mid', [ROCK] * 8)


@pytest.fixture
def rock_with_fills(tmp_path):
    return write_pattern(tmp_path / 'fills.mid', ([ROCK] * 3 + [FILL]) * 2)


def test_a_plain_rock_beat(rock):
    stats = groove_stats([rock])
    assert (stats['kick_per_bar'], stats['snare_per_bar'], stats['closed_hihat_per_bar']) == (2, 2, 8)
    assert stats['ride_per_bar'] == stats['crash_per_bar'] == 0
    assert stats['notes_per_bar'] == 12 and stats['hit_steps'] == 0.5  # hits on the 8 eighth notes
    assert stats['kick_on_1_3'] == stats['snare_on_2_4'] == stats['backbeat_bars'] == 1
    assert stats['repeat_prev_bar'] == stats['repeat_4_bars_back'] == 1


def test_a_rock_beat_with_a_fill_every_fourth_bar(rock_with_fills):
    stats = groove_stats([rock_with_fills])
    assert stats['kick_per_bar'] == (6 * 2 + 2) / 8 and stats['snare_per_bar'] == (6 * 2 + 2 * 8) / 8
    assert stats['closed_hihat_per_bar'] == 6 * 8 / 8
    assert stats['kick_on_1_3'] == 1  # the fill's kick is on 1 too
    assert stats['snare_on_2_4'] == (12 + 2) / 28  # the roll's step 12 is on beat 4
    assert stats['backbeat_bars'] == 6 / 8  # a fill has beat 4, not beat 2
    assert stats['repeat_prev_bar'] == 4 / 7  # bars 2, 3, 6 and 7; not 4 (fill), 5 (after it), 8
    assert stats['repeat_4_bars_back'] == 1  # bars 5-8 are bars 1-4 again
    assert stats['hit_steps'] == (6 * 8 + 2 * 9) / (8 * 16)


def test_shares_with_nothing_to_count_are_nan(tmp_path):
    two_bars = write_pattern(tmp_path / 'hats.mid', [{HAT: (0, 4)}] * 2)
    stats = groove_stats([two_bars])
    assert math.isnan(stats['snare_on_2_4']) and math.isnan(stats['kick_on_1_3'])
    assert math.isnan(stats['repeat_4_bars_back']) and stats['repeat_prev_bar'] == 1
    assert stats['backbeat_bars'] == 0


def test_a_partial_last_bar_is_left_out(rock):
    assert groove_stats([np.concatenate([rock, rock[:8]])]) == groove_stats([rock])


def test_the_distance_is_zero_for_the_same_groove_and_one_for_disjoint_ones(rock, rock_with_fills, tmp_path):
    offbeat_ride = write_pattern(tmp_path / 'ride.mid', [{RIDE: (2, 6, 10, 14)}] * 4)
    assert groove_report([rock], [rock, rock])['distance'] == 0
    assert groove_report([offbeat_ride], [rock])['distance'] == pytest.approx(1)
    between = groove_report([rock_with_fills], [rock])['distance']
    assert 0 < between < 0.1


def test_jensen_shannon_by_hand():
    # p = (1/2, 1/2, 0), q = (0, 1/2, 1/2): m = (1/4, 1/2, 1/4); KL(p||m) = 1/2 log2 2 = 1/2 bit.
    assert js_divergence(np.array([1, 1, 0]), np.array([0, 3, 3])) == pytest.approx(0.5)
    assert math.isnan(js_divergence(np.zeros(3), np.ones(3)))


def test_the_report_as_metrics_json_and_png(rock, rock_with_fills, tmp_path):
    report = groove_report([rock_with_fills], [rock])
    metrics = report_metrics(report)
    assert metrics['groove_backbeat_bars'] == 0.75 and metrics['groove_distance'] == report['distance']
    write_report(groove_report([rock[:32]], [rock]), tmp_path / 'groove.json')
    written = json.loads((tmp_path / 'groove.json').read_text())
    assert written['samples']['repeat_4_bars_back'] is None  # NaN: two bars have no bar k - 4
    assert written['reference']['backbeat_bars'] == 1 and written['bars'] == {'samples': 2, 'reference': 8}
    plot_report(report, tmp_path / 'groove.png', title='test')
    assert (tmp_path / 'groove.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
