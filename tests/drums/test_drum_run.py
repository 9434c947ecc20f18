"""The drum RNN through real `dora run`: checkpoints, metrics, playable MIDI files, resume."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import mido
import numpy as np
import pytest
import torch

from solver.checkpointing.envelope import read_checkpoint
from solver.drums.midi import read_drum_events, read_drum_track

DEBUG = ('run', 'solver=drum_rnn/debug', 'checkpoint.save_every=1')
pytestmark = pytest.mark.integration
METRICS = {'loss', 'perplexity', 'accuracy', 'event_accuracy', 'no_event_accuracy'}
pytestmark = pytest.mark.integration  # every test here reads or starts a real dora run


@pytest.fixture(scope='module')
def debug_xp(tmp_path_factory: pytest.TempPathFactory, dora_tools) -> tuple[Path, Path, str]:
    """One finished debug run shared by the tests of this module: (dora dir, xp folder, output)."""
    dora_dir = tmp_path_factory.mktemp('drums') / 'dora'
    code, out = dora_tools.run(dora_dir, *DEBUG, timeout=300)
    assert code == 0, out[-2000:]
    return dora_dir, dora_tools.folder(dora_dir, *DEBUG[1:]), out


def test_debug_run_leaves_checkpoints_and_history(debug_xp):
    _, xp, _ = debug_xp
    ckpt = read_checkpoint(xp / 'checkpoint.th')
    assert ckpt.meta['epoch'] == 2 and ckpt.meta['sig'] == xp.name
    assert {'model', 'optimizer', 'best_state', 'rng', 'progress'} <= set(ckpt.state)
    assert (xp / 'checkpoint_1.th').exists() and (xp / 'checkpoint_2.th').exists()
    history = json.loads((xp / 'history.json').read_text())
    assert len(history) == 2
    for epoch in history:
        assert METRICS <= set(epoch['train']) and METRICS <= set(epoch['valid'])


def test_evaluate_logs_metrics_beside_both_baselines(debug_xp):
    _, xp, _ = debug_xp
    evaluate = json.loads((xp / 'history.json').read_text())[-1]['evaluate']
    assert METRICS <= set(evaluate)
    assert 0 < evaluate['baseline_repeat_bar_accuracy'] < 1
    assert 1 < evaluate['baseline_unigram_perplexity'] < 512
    for name in ('loss', 'perplexity', 'accuracy', 'accuracy_from_bar_2'):  # 95% bootstrap intervals
        assert evaluate[f'{name}_ci_low'] <= evaluate[name] <= evaluate[f'{name}_ci_high']


def test_generated_midi_files_are_playable_drum_tracks(debug_xp):
    _, xp, _ = debug_xp
    files = sorted((xp / 'samples' / 'epoch_2').glob('*.mid'))
    assert len(files) == 2  # generate.num_samples in the debug config
    for path in files:
        midi = mido.MidiFile(path)
        notes = [m for track in midi.tracks for m in track if m.type == 'note_on' and m.velocity > 0]
        assert notes and all(m.channel == 9 for m in notes)
        assert all(m.velocity == 100 for m in notes)
        assert len(read_drum_events(path)) > 0
        png = path.with_suffix('.png')
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        with wave.open(str(path.with_suffix('.wav'))) as preview:  # 32 steps at 120 qpm: 4 s, and a ring
            assert 4.0 <= preview.getnframes() / preview.getframerate() < 6.0


def test_rerun_resumes_at_the_next_epoch_with_the_same_history(debug_xp, dora_tools, tmp_path):
    dora_dir, xp, _ = debug_xp
    copy = tmp_path / 'dora'
    shutil.copytree(dora_dir, copy, symlinks=True)
    moved = copy / 'xps' / xp.name
    original = json.loads((moved / 'history.json').read_text())
    shutil.copy(moved / 'checkpoint_1.th', moved / 'checkpoint.th')
    (moved / 'checkpoint_2.th').unlink()
    code, out = dora_tools.run(copy, *DEBUG, timeout=300)
    assert code == 0, out[-2000:]
    assert 'Resumed from' in out and '(epoch 1,' in out
    resumed = json.loads((moved / 'history.json').read_text())
    strip = [{stage: {k: v for k, v in m.items() if k != 'duration'} for stage, m in e.items()}
             for e in resumed]
    expected = [{stage: {k: v for k, v in m.items() if k != 'duration'} for stage, m in e.items()}
                for e in original]
    assert strip == expected
    # ...and the weights are bit-identical to the uninterrupted run's.
    a = read_checkpoint(xp / 'checkpoint.th').state['model']
    b = read_checkpoint(moved / 'checkpoint.th').state['model']
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_execute_only_generate_writes_samples_without_new_history(debug_xp, dora_tools):
    dora_dir, xp, _ = debug_xp
    before = {name: (xp / name).read_bytes() for name in ('history.json', 'checkpoint.th')}
    trained = {p: p.read_bytes() for p in (xp / 'samples' / 'epoch_2').iterdir()}
    code, out = dora_tools.run(dora_dir, *DEBUG, 'execute_only=generate', timeout=300)
    assert code == 0, out[-2000:]
    assert {name: (xp / name).read_bytes() for name in before} == before
    assert {p: p.read_bytes() for p in (xp / 'samples' / 'epoch_2').iterdir()} == trained
    assert 'Wrote 2 samples' in out
    assert len(list((xp / 'samples' / 'generate_000').glob('sample_*.wav'))) == 2


def test_generate_on_demand_from_a_primer_continues_its_first_bar(debug_xp, dora_tools, tmp_path, band_song):
    dora_dir, xp, _ = debug_xp
    primer = band_song(tmp_path / 'primer.mid', intro_bars=2, groove_bars=4)  # 3/4 intro, 92 qpm
    first_bar = read_drum_track(primer).sections[0][:16]
    args = ('run', 'solver=drum_rnn/debug', f'continue_from=//sig/{xp.name}', 'execute_only=generate',
            f'generate.primer={primer}', 'generate.num_samples=3', 'generate.num_steps=48',
            'generate.temperature=0.7')
    history = (xp / 'history.json').read_bytes()
    code, out = dora_tools.run(dora_dir, *args, timeout=300)
    assert code == 0, out[-2000:]
    assert 'Continuing from the best state' in out and 'Wrote 3 samples' in out
    here = dora_tools.folder(dora_dir, *args[1:])
    samples = sorted((here / 'samples' / 'generate_000').glob('*.mid'))
    assert len(samples) == 3
    for path in samples:
        track = read_drum_track(path)
        assert len(track.sections[0]) == 48 and track.qpm == pytest.approx(92, abs=0.01)
        np.testing.assert_array_equal(track.sections[0][:16], first_bar)
        with wave.open(str(path.with_suffix('.wav'))) as preview:  # 48 steps at 92 qpm, cut at 8 s
            assert 8.0 <= preview.getnframes() / preview.getframerate() < 10.0
    assert not (here / 'history.json').exists() and not (here / 'checkpoint.th').exists()
    assert (xp / 'history.json').read_bytes() == history


def test_finetune_continues_from_the_pretrained_best_state_on_a_messy_folder(debug_xp, dora_tools, tmp_path,
                                                                             band_song):
    dora_dir, xp, _ = debug_xp
    mine = tmp_path / 'mine'
    band_song(mine / 'drummer1/session1/1_funk_92_beat_4-4.mid', intro_bars=2, groove_bars=20)
    band_song(mine / 'drummer1/session2/2_rock_104_beat_4-4.mid', intro_bars=0, groove_bars=14, seed=1)
    args = ('run', 'solver=drum_rnn/finetune', f'continue_from=//sig/{xp.name}', f'dataset.path={mine}',
            'model.hidden_size=32', 'model.num_layers=1', 'dataset.batch_size=16', 'dataset.window_steps=32',
            'optim.epochs=2', 'optim.updates_per_epoch=3', 'generate.num_steps=32')
    code, out = dora_tools.run(dora_dir, *args, timeout=300)
    assert code == 0, out[-2000:]
    assert 'Continuing from the best state' in out
    assert 'split by sections of 2 bars' in out and 'time signature 3/4: 2' in out
    here = dora_tools.folder(dora_dir, *args[1:])
    ckpt = read_checkpoint(here / 'checkpoint.th')
    assert ckpt.meta['config']['optim']['lr'] == pytest.approx(1e-3)
    history = json.loads((here / 'history.json').read_text())
    assert len(history) == 2
    assert {'accuracy_from_bar_2', 'baseline_repeat_bar_accuracy'} <= set(history[-1]['evaluate'])



def test_finetune_stops_when_its_valid_loss_stops_improving(debug_xp, dora_tools, band_song, tmp_path):
    dora_dir, xp, _ = debug_xp
    mine = band_song(tmp_path / 'mine' / 'song.mid', intro_bars=0, groove_bars=16).parent
    # lr 0: the valid loss never improves after the first epoch, so early_stop (patience 2 in
    # finetune.yaml) ends the run at epoch 3 of at most 20
    args = ('run', 'solver=drum_rnn/finetune', f'continue_from=//sig/{xp.name}', f'dataset.path={mine}',
            'model.hidden_size=32', 'model.num_layers=1', 'dataset.batch_size=16', 'dataset.window_steps=32',
            'optim.updates_per_epoch=2', 'optim.lr=0', 'evaluate.every=0', 'generate.every=0')
    code, out = dora_tools.run(dora_dir, *args, timeout=300)
    assert code == 0, out[-2000:]
    assert 'Early stop at epoch 3' in out
    history = json.loads((dora_tools.folder(dora_dir, *args[1:]) / 'history.json').read_text())
    assert len(history) == 3 and history[-1]['early_stop']['patience'] == 2


def test_the_attention_variant_trains_magentas_attention_layer_under_bfloat16_autocast(dora_tools, dora_dir):
    args = ('run', 'solver=drum_rnn/attention', 'model.hidden_size=16', 'model.num_layers=2',
            'dataset.batch_size=8', 'dataset.window_steps=32', 'optim.epochs=1', 'optim.updates_per_epoch=2',
            'optim.autocast=bfloat16',
            'generate.num_steps=32', 'generate.num_samples=1', 'generate.wav=false')
    code, out = dora_tools.run(dora_dir, *args, timeout=300)
    assert code == 0, out[-2000:]
    ckpt = read_checkpoint(dora_tools.folder(dora_dir, *args[1:]) / 'checkpoint.th')
    assert ckpt.meta['config']['model']['attention_length'] == 32
    assert ckpt.state['model']['first.key.weight'].shape == (16, 16)  # the attention's key projection
    assert json.loads((dora_tools.folder(dora_dir, *args[1:]) / 'history.json').read_text())[0]['evaluate']

@pytest.fixture(scope='module')
def tiny_xp(tmp_path_factory: pytest.TempPathFactory, dora_tools, band_song) -> tuple[Path, Path, tuple[str, ...]]:
    """A debug run on one 12-bar song: 4 training windows for a batch of 16."""
    root = tmp_path_factory.mktemp('tiny')
    band_song(root / 'mine' / 'song.mid', intro_bars=1, groove_bars=12)
    args = (*DEBUG, f'dataset.path={root / "mine"}')
    code, out = dora_tools.run(root / 'dora', *args, timeout=300)
    assert code == 0, out[-2000:]
    assert 'train: 1 files, 4 windows' in out
    return root / 'dora', dora_tools.folder(root / 'dora', *args[1:]), args


def test_a_set_smaller_than_a_batch_trains_with_full_batches(tiny_xp):
    _, xp, _ = tiny_xp
    history = json.loads((xp / 'history.json').read_text())
    assert len(history) == 2 and all(METRICS <= set(epoch['valid']) for epoch in history)
    assert read_checkpoint(xp / 'checkpoint.th').state['progress']['train_batches'] == 10


def test_a_set_smaller_than_a_batch_resumes_bit_exact(tiny_xp, dora_tools, tmp_path):
    dora_dir, xp, args = tiny_xp
    copy = tmp_path / 'dora'
    shutil.copytree(dora_dir, copy, symlinks=True)
    moved = copy / 'xps' / xp.name
    shutil.copy(moved / 'checkpoint_1.th', moved / 'checkpoint.th')
    (moved / 'checkpoint_2.th').unlink()
    code, out = dora_tools.run(copy, *args, timeout=300)
    assert code == 0, out[-2000:]
    a = read_checkpoint(xp / 'checkpoint.th').state['model']
    b = read_checkpoint(moved / 'checkpoint.th').state['model']
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_folder_without_usable_drums_stops_with_a_clear_error(dora, tmp_path):
    data = tmp_path / 'mine'
    data.mkdir()
    (data / 'notes.mid').write_text('not a midi file')
    code, out = dora('run', 'solver=drum_rnn/debug', f'dataset.path={data}', timeout=300)
    assert code != 0
    assert 'notes.mid' in out  # the skipped file is named, with the reason
    assert 'dataset.path' in out.strip().splitlines()[-1] or 'dataset.path' in out[-600:]


def test_beam_search_from_primer_drums_with_a_groove_report_and_previews_in_tensorboard(dora_tools, dora_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ('run', 'solver=drum_rnn/debug', 'logging.log_tensorboard=true', 'generate.primer_drums="[(36,),(),(42,)]"',
            'generate.beam_size=2', 'generate.branch_factor=2', 'generate.steps_per_iteration=4')
    code, out = dora_tools.run(dora_dir, *args, timeout=300)
    assert code == 0, out[-2000:]
    assert 'beam 2/2/4' in out and 'groove distance to the evaluate split' in out
    xp = dora_tools.folder(dora_dir, *args[1:])
    for epoch, metrics in enumerate(json.loads((xp / 'history.json').read_text()), start=1):
        generate = metrics['generate']
        assert 0 <= generate['groove_distance'] <= 1 and generate['log_likelihood_per_step'] < 0
        assert {'groove_kick_per_bar', 'groove_backbeat_bars', 'groove_repeat_prev_bar'} <= set(generate)
        folder = xp / 'samples' / f'epoch_{epoch}'
        report = json.loads((folder / 'groove.json').read_text())
        assert report['bars']['samples'] == 2 * 2 and report['distance'] == pytest.approx(generate['groove_distance'])
        assert (folder / 'groove.png').stat().st_size > 0
        for sample in folder.glob('sample_*.mid'):
            assert read_drum_events(sample)[:3].tolist() == [1, 0, 4]  # kick, silence, closed hi-hat
    board = EventAccumulator(str(xp / 'tensorboard'), size_guidance={'audio': 0})
    board.Reload()
    assert board.Tags()['audio'] == ['generate/sample_00', 'generate/sample_01']
    for tag in board.Tags()['audio']:
        previews = board.Audio(tag)
        assert [p.step for p in previews] == [1, 2]  # one per epoch
        assert all(p.encoded_audio_string[:4] == b'RIFF' and 4.0 <= p.length_frames / p.sample_rate < 6.0
                   for p in previews)
