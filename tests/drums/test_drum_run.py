"""The drum RNN through real `dora run`: checkpoints, metrics, playable MIDI files, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mido
import pytest
import torch

from solver.checkpointing.format import read_checkpoint
from solver.drums.midi import read_drum_events

DEBUG = ('run', 'solver=drum_rnn/debug', 'checkpoint.save_every=1')
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
    before = (xp / 'history.json').read_text()
    code, out = dora_tools.run(dora_dir, *DEBUG, 'execute_only=generate', timeout=300)
    assert code == 0, out[-2000:]
    assert (xp / 'history.json').read_text() == before
    assert 'Wrote 2 samples' in out


def test_a_folder_without_usable_drums_stops_with_a_clear_error(dora, tmp_path):
    data = tmp_path / 'mine'
    data.mkdir()
    (data / 'notes.mid').write_text('not a midi file')
    code, out = dora('run', 'solver=drum_rnn/debug', f'dataset.path={data}', timeout=300)
    assert code != 0
    assert 'notes.mid' in out  # the skipped file is named, with the reason
    assert 'dataset.path' in out.strip().splitlines()[-1] or 'dataset.path' in out[-600:]
