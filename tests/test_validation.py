"""The config is checked once, before anything is built: each impossible value is refused naming
the key, the value and what is allowed; a config that never saves needs an explicit opt-out."""

from __future__ import annotations

import dataclasses
import functools
import typing as tp
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from solver import builders
from solver.checkpointing.config import CheckpointConfig, RollbackConfig
from solver.errors import ConfigError, UserError

CONFIG = Path(__file__).resolve().parents[1] / 'config'


@functools.cache
def composed(solver: str) -> tp.Any:
    with initialize_config_dir(str(CONFIG), version_base='1.3'):
        return compose('config', [f'solver={solver}'])


def config(*overrides: str, solver: str = 'regression') -> tp.Any:
    """The config `dora run solver=<solver> <overrides>` would get (composed once per solver)."""
    cfg = composed(solver).copy()
    with open_dict(cfg):
        for override in overrides:
            key, value = override.split('=', 1)
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value not in ('nan', 'inf') else float(value))
    return cfg


@pytest.mark.parametrize('solver', ['regression', 'drum_rnn', 'drum_rnn/debug', 'drum_rnn/attention',
                                    'drum_rnn/finetune'])
def test_the_shipped_configs_pass(solver):
    builders.check_config(config(solver=solver))


@pytest.mark.parametrize('override, allowed', [
    ('optim.epochs=0', 'an integer >= 1'),
    ('optim.epochs=2.5', 'an integer >= 1'),
    ('optim.lr=-0.1', 'a finite number >= 0'),
    ('optim.lr=nan', 'a finite number >= 0'),
    ('optim.lr=inf', 'a finite number >= 0'),
    ('dataset.batch_size=0', 'an integer >= 1'),
    ('checkpoint.keep_last=-2', 'null or an integer >= 0'),
    ('checkpoint.keep_best=-1', 'null or an integer >= 0'),
    ('checkpoint.every_steps=0', 'null or an integer >= 1'),
    ('checkpoint.save_every=0', 'null or an integer >= 1'),
    ('checkpoint.every_minutes=0', 'null or a number > 0'),
    ('checkpoint.max_overhead=1.5', 'null or a share in (0, 1)'),
    ('checkpoint.max_overhead=0', 'null or a share in (0, 1)'),
    ('early_stop.patience=-1', 'null or an integer >= 0'),
    ('early_stop.min_delta=-0.5', 'a number >= 0'),
    ('optim.updates_per_epoch=0', 'null or an integer >= 1'),
    ('schedule.lr_scheduler=linear', 'one of cosine, step'),
    ('schedule.warmup=-5', 'an integer >= 0'),
    ('schedule.gamma=0', 'a number > 0'),
])
def test_an_impossible_value_is_refused_naming_key_value_and_what_is_allowed(override, allowed):
    key, value = override.split('=')
    with pytest.raises(ConfigError) as err:
        builders.check_config(config(override))
    assert f"{key}=" in str(err.value) and allowed in str(err.value)
    assert value.lower() in str(err.value).lower()


def test_a_step_schedule_without_step_size_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r'schedule.step_size=None .*updates between decays'):
        builders.check_config(config('schedule.lr_scheduler=step'))
    builders.check_config(config('schedule.lr_scheduler=step', 'schedule.step_size=10'))


def test_base_yaml_holds_exactly_the_checkpoint_keys_and_defaults_of_their_definition():
    section = OmegaConf.load(CONFIG / 'base.yaml').checkpoint
    assert set(section) == {item.name for item in dataclasses.fields(CheckpointConfig)}
    assert set(section.rollback) == {item.name for item in dataclasses.fields(RollbackConfig)}
    assert CheckpointConfig.parse(section) == CheckpointConfig()


def test_an_unknown_execute_only_is_refused_listing_the_stages():
    with pytest.raises(ConfigError, match="execute_only='train': expected one of valid, evaluate, generate"):
        builders.check_config(config('execute_only=train'))


def test_a_config_that_never_saves_is_refused_naming_the_keys():
    with pytest.raises(ConfigError) as err:
        builders.check_config(config('checkpoint.save_last=false'))
    assert 'checkpoint.save_last' in str(err.value) and 'checkpoint.save_every' in str(err.value)
    assert 'checkpoint.allow_none=true' in str(err.value)


@pytest.mark.parametrize('overrides', [
    ('checkpoint.save_last=false', 'checkpoint.allow_none=true'),
    ('checkpoint.save_last=false', 'checkpoint.save_every=2'),
    ('checkpoint.save_last=false', 'checkpoint.every_minutes=5'),
    ('checkpoint.save_last=false', 'execute_only=evaluate'),
])
def test_a_config_without_save_last_passes_when_something_else_saves_or_it_is_meant(overrides):
    builders.check_config(config(*overrides))


@pytest.mark.parametrize('override, message', [
    ('generate.temperature=0', 'generate.temperature=0'),
    ('generate.temperature=-1.0', 'generate.temperature=-1.0'),
    ('generate.primer=/no/such/primer.mid', 'generate.primer=/no/such/primer.mid'),
    ('generate.beam_size=0', 'generate.beam_size=0'),
    ('generate.branch_factor=1.5', 'generate.branch_factor=1.5'),
    ('generate.steps_per_iteration=0', 'generate.steps_per_iteration=0'),
    ('generate.primer_drums="[(36,),(999,)]"', "generate.primer_drums='[(36,),(999,)]': step 1: 999 is not"),
    ('generate.primer_drums="[36, 42]"', "step 0 is 36, not a tuple of MIDI pitches"),
    ('generate.primer_drums="[]"', "must be a non-empty list"),
    ('generate.primer_drums="__import__(\'os\').getcwd()"', "is not a Python list literal"),
    ('generate.primer_drums="[(36,)] * 40"', "is not a Python list literal"),
    ('generate.primer_drums="[(36,), (True,)]"', "True is not a General MIDI drum kit pitch"),
    ('generate.primer_drums=[36]', "give it as a quoted string"),
    (f'generate.primer_drums="{[(36,)] * 33}"', "has 33 steps, more than generate.num_steps=32"),
    (('generate.primer_drums="[(36,)]"', 'generate.primer=x.mid'), "are both set"),
    ('optim.autocast=float16', "optim.autocast='float16' cannot work: give null (float32) or bfloat16"),
])
def test_the_drum_solver_refuses_generate_and_precision_settings_before_training(override, message):
    overrides = override if isinstance(override, tuple) else (override,)
    with pytest.raises(ConfigError) as err:
        builders.check_config(config(*overrides, solver='drum_rnn/debug'))
    assert message in str(err.value) and '\n' not in str(err.value)


def test_magentas_primer_drums_syntax_passes():
    builders.check_config(config('generate.primer_drums="[(36, 42), (), (42,), (38, 46)]"', 'generate.beam_size=2',
                                 solver='drum_rnn/debug'))


def test_every_user_error_kind_derives_from_user_error():
    from solver.checkpointing.faults import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
    from solver.checkpointing.lock import ExperimentLockedError
    from solver.distrib import RankMismatchError
    from solver.errors import SolverError
    kinds = [SolverError, ConfigError, CheckpointError, CorruptCheckpointError, UnsafeCheckpointError,
             ExperimentLockedError, RankMismatchError]
    assert all(issubclass(kind, UserError) for kind in kinds)


@pytest.mark.parametrize('overrides, message', [
    (('checkpoint.keep_dtype=float32',), "checkpoint.keep_dtype='float32': expected one of bf16, fp16"),
    (('checkpoint.keep_dtype=bf16', 'fsdp.use=true'), 'checkpoint.keep_dtype cannot reduce sharded'),
])
def test_keep_dtype_is_refused_naming_the_key_for_a_dtype_it_does_not_reduce_to_or_sharded_states(overrides, message):
    with pytest.raises(ConfigError) as err:
        builders.check_config(config(*overrides))
    assert message in str(err.value) and '\n' not in str(err.value)


@pytest.mark.parametrize('overrides, message', [
    (('checkpoint.compress=lz4',), "checkpoint.compress='lz4': expected one of zstd"),
    (('checkpoint.compress=zstd', 'checkpoint.incremental=true'),
     'checkpoint.compress=zstd cannot be combined with checkpoint.incremental=true'),
    (('checkpoint.compress=zstd', 'fsdp.use=true'), 'checkpoint.compress=zstd cannot be combined with fsdp.use=true'),
])
def test_compress_is_refused_naming_the_keys_for_an_unknown_codec_incremental_or_sharded_states(overrides, message):
    with pytest.raises(ConfigError) as err:
        builders.check_config(config(*overrides))
    assert message in str(err.value) and '\n' not in str(err.value)
