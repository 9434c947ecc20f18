"""`checkpoint.compress=zstd`: each tensor of a checkpoint stored as a zstd frame of its bytes
(floats byte-shuffled), read back bit-exactly by every reader; a real run resumes from such files.
Forged entries and frames: tests/test_hostile.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REGRESSION, SOLVER, back_to_epoch_1, copy_xp, history, run_dora, run_xp, without_durations

from solver.checkpointing import archive, codec, envelope
from solver.checkpointing.faults import CheckpointError


def state() -> dict:
    base = torch.randn(8, 6)
    return {'model': {'f32': torch.randn(300, 7), 'bf16': torch.randn(33).bfloat16(), 'f16': torch.randn(9).half(),
                      'f64': torch.randn(5).double(), 'int': torch.arange(-50, 50), 'bool': torch.tensor([True, False]),
                      'u8': torch.randint(0, 256, (5056,), dtype=torch.uint8), 'view': base.t()[1:],
                      'nan': torch.tensor([float('nan'), -0.0, float('inf')]),
                      'empty': torch.empty(0, 3), 'scalar': torch.tensor(2.5)},
            'history': [{'train': {'loss': 0.5}}], 'rng': torch.get_rng_state()}


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_compressed_file_reads_back_bit_exact_for_every_dtype_view_and_empty_tensor(tmp_path: Path):
    saved = state()
    envelope.write_checkpoint(tmp_path / 'c.th', saved, {'epoch': 1}, compress='zstd')
    loaded = envelope.read_checkpoint(tmp_path / 'c.th').state  # digests checked on the decoded bytes
    for name, tensor in saved['model'].items():
        back = loaded['model'][name]
        assert (back.dtype, back.shape, raw_bytes(back)) == (tensor.dtype, tensor.shape, raw_bytes(tensor)), name
    assert raw_bytes(loaded['rng']) == raw_bytes(saved['rng']) and loaded['history'] == saved['history']


def test_its_tensors_are_frames_in_stored_records_with_a_table_and_the_meta_stays_plain(tmp_path: Path):
    saved = {'w': torch.zeros(1 << 16)}
    envelope.write_checkpoint(tmp_path / 'c.th', saved, {'epoch': 7}, compress='zstd')
    raw = torch.load(tmp_path / 'c.th', weights_only=True)  # plain torch reads it: no compressed zip records
    assert raw['meta']['epoch'] == 7 and raw['compressed']['refs'] == [('zstd+shuffle', 'torch.float32', (65536,),
                                                                          262144)]
    assert raw['state']['w'].dtype == torch.uint8 and raw['state']['w'].numel() < 1000
    assert (tmp_path / 'c.th').stat().st_size < 262144 // 4  # zip and alignment overhead included


def test_read_into_a_live_state_reads_nothing_into_it_and_loads_the_values(tmp_path: Path):
    saved = state()
    envelope.write_checkpoint(tmp_path / 'c.th', saved, {'epoch': 1}, compress='zstd')
    live = {'model': {name: torch.zeros_like(t) for name, t in saved['model'].items()}, 'rng': torch.zeros(5056,
                                                                                                            dtype=torch.uint8)}
    ckpt = envelope.read_checkpoint(tmp_path / 'c.th', into=live)
    assert ckpt.live == [] and not live['rng'].any()  # a frame of the same length is never read into it
    assert torch.equal(ckpt.state['model']['f32'], saved['model']['f32'])


def test_a_damaged_byte_in_a_frame_is_caught_by_a_digest_or_by_decoding(tmp_path: Path):
    envelope.write_checkpoint(tmp_path / 'c.th', {'w': torch.randn(4096)}, {'epoch': 1}, compress='zstd')
    frame = raw_bytes(torch.load(tmp_path / 'c.th', weights_only=True)['state']['w'])
    data = bytearray((tmp_path / 'c.th').read_bytes())
    data[data.index(frame) + len(frame) // 2] ^= 0xFF
    (tmp_path / 'c.th').write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'c.th'} is damaged"):
        envelope.read_checkpoint(tmp_path / 'c.th')


def test_an_unknown_encoding_is_refused_before_anything_is_written(tmp_path: Path):
    with pytest.raises(CheckpointError, match="compress='lz4'"):
        envelope.write_checkpoint(tmp_path / 'c.th', {'w': torch.ones(2)}, {}, compress='lz4')
    assert not list(tmp_path.iterdir())


def test_floats_are_shuffled_and_the_rest_is_not():
    _, table = codec.encode({'f': torch.ones(4), 'b': torch.ones(4).bfloat16(), 'i': torch.ones(4, dtype=torch.int32)})
    assert [ref[0] for ref in table['refs']] == ['zstd+shuffle', 'zstd+shuffle', 'zstd']
    assert archive.AVAILABLE


# -- through real runs ------------------------------------------------------------------------------

COMPRESSED = (*REGRESSION, 'checkpoint.save_every=1', 'checkpoint.compress=zstd')


@pytest.mark.integration
def test_a_run_with_compressed_checkpoints_resumes_and_ends_as_the_uninterrupted_run(dora_tools, tmp_path):
    trained = run_xp(tmp_path / 'dora', *COMPRESSED)
    ckpt = torch.load(trained.folder / 'checkpoint.th', weights_only=True)
    assert codec.is_compressed(ckpt)  # written compressed, by the async writer (the default)
    xp = copy_xp(trained, tmp_path / 'copy')
    back_to_epoch_1(xp.folder)
    code, output = run_dora(xp.dora_dir, 'run', *COMPRESSED)
    assert code == 0, output
    assert f"Resumed from {xp.folder / 'checkpoint.th'} (epoch 1," in output
    assert without_durations(history(xp.folder)) == without_durations(history(trained.folder))
    env = dora_tools.env(xp.dora_dir)
    for command in ([*SOLVER, 'verify', xp.folder.name], [*SOLVER, 'export', xp.folder.name, str(tmp_path / 'm.th')],
                    [*SOLVER[:2], 'solver.checkpointing.examine', str(xp.folder / 'checkpoint_1.th')]):
        result = subprocess.run(command, cwd=dora_tools.root, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    assert 'model' in envelope.read_checkpoint(tmp_path / 'm.th').state['best_state']['states']
    code, output = run_dora(xp.dora_dir, 'run', *REGRESSION, f'continue_from={xp.folder / "checkpoint_1.th"}',
                            'optim.epochs=2')
    assert code == 0 and f"Continuing from the best state of {xp.folder / 'checkpoint_1.th'}" in output, output
