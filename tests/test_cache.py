"""Specification of the data cache (solver/cache.py): one entry per key, read back exactly, every
damaged or foreign file reported and rebuilt, the folder kept within its bound."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from solver.cache import DataCache, Entry, files_digest, from_config

KEY = {'files': 'abc', 'setting': 4}


class Arrays:
    """The simplest codec: the value is the dict of arrays itself."""

    def encode(self, value: dict[str, np.ndarray]) -> Entry:
        return Entry(dict(value), {'names': sorted(value)})

    def decode(self, entry: Entry) -> dict[str, np.ndarray]:
        if sorted(entry.arrays) != entry.info['names']:
            raise ValueError("names differ")
        return entry.arrays


class Builder:
    def __init__(self, size: int = 100) -> None:
        self.calls, self.size = 0, size

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return {'events': np.arange(self.size, dtype=np.uint16), 'lengths': np.array([self.size], np.int64)}


def get(cache: DataCache, build: Builder, key: dict = KEY) -> dict[str, np.ndarray]:
    return cache.get('thing', key, build, Arrays())


def test_a_value_is_built_once_then_read_back_exactly(tmp_path):
    cache, build = DataCache(tmp_path / 'cache', 1 << 20), Builder()
    first = get(cache, build)
    second = get(cache, build)
    assert build.calls == 1
    assert second.keys() == first.keys() and all(np.array_equal(second[k], first[k]) for k in first)
    assert second['events'].dtype == np.uint16


def test_another_key_is_another_entry(tmp_path):
    cache, build = DataCache(tmp_path / 'cache', 1 << 20), Builder()
    get(cache, build)
    get(cache, build, {**KEY, 'setting': 5})
    get(cache, build, {**KEY, 'files': 'abd'})
    assert build.calls == 3 and len(list(cache.folder.glob('*.cache'))) == 3
    get(cache, build, {'setting': 4, 'files': 'abc'})  # the same key, in another order
    assert build.calls == 3


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _foreign(path: Path) -> None:  # a whole, valid entry of another key under this name
    other = DataCache(path.parent, 1 << 20)
    get(other, Builder(7), {'other': 1})
    os.replace(other.path('thing', {'other': 1}), path)


DAMAGES = {
    'a flipped byte': (_flip, 'digest does not match'),
    'truncated': (lambda p: p.write_bytes(p.read_bytes()[:-10]), 'digest does not match'),
    'empty': (lambda p: p.write_bytes(b''), 'not a data cache file'),
    'not ours': (lambda p: p.write_bytes(b'\x89PNG' + b'\0' * 100), 'not a data cache file'),
    'of another key': (_foreign, 'another key'),
    'a symbolic link': (lambda p: (p.unlink(), p.symlink_to('/dev/zero')), 'symbolic link'),
    'a FIFO': (lambda p: (p.unlink(), os.mkfifo(p)), 'FIFO'),
    'over the bound': (lambda p: p.write_bytes(p.read_bytes() + b'\0' * (1 << 20)), 'more than'),
}


@pytest.mark.parametrize('damage', list(DAMAGES))
def test_a_damaged_entry_is_reported_in_one_line_and_rebuilt(tmp_path, caplog, damage):
    cache, build = DataCache(tmp_path / 'cache', 1 << 20), Builder()
    get(cache, build)
    path = cache.path('thing', KEY)
    spoil, reason = DAMAGES[damage]
    spoil(path)
    with caplog.at_level(logging.WARNING, logger='solver.cache'):
        value = get(cache, build)
    assert build.calls == 2 and np.array_equal(value['events'], np.arange(100))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(path) in warning and reason in warning and 'rebuilding' in warning
    assert path.is_file() and not path.is_symlink()  # replaced by a whole entry
    get(cache, build)
    assert build.calls == 2


def test_a_codec_that_finds_the_entry_inconsistent_rebuilds_it(tmp_path, caplog):
    cache, build = DataCache(tmp_path / 'cache', 1 << 20), Builder()
    cache.get('thing', KEY, build, Arrays())

    class Stricter(Arrays):
        def decode(self, entry: Entry) -> dict[str, np.ndarray]:
            raise ValueError("lengths do not add up")

    with caplog.at_level(logging.WARNING, logger='solver.cache'):
        cache.get('thing', KEY, build, Stricter())
    assert build.calls == 2 and 'lengths do not add up' in caplog.text


def test_the_folder_keeps_the_most_recently_used_entries_within_its_bound(tmp_path):
    cache, build = DataCache(tmp_path / 'cache', 1 << 20), Builder(500)
    get(cache, build, {'setting': 1})
    cache.max_bytes = int(2.5 * cache.path('thing', {'setting': 1}).stat().st_size)  # two entries fit, not three
    get(cache, build, {'setting': 2})
    old = cache.path('thing', {'setting': 1})
    os.utime(old, (1, 1))  # used long ago
    get(cache, build, {'setting': 2})  # a hit: now the most recent
    get(cache, build, {'setting': 3})
    assert not old.exists()
    assert cache.path('thing', {'setting': 2}).exists() and cache.path('thing', {'setting': 3}).exists()


def test_a_value_larger_than_the_bound_is_used_and_not_cached(tmp_path):
    cache, build = DataCache(tmp_path / 'cache', 1000), Builder(1000)
    assert len(get(cache, build)['events']) == 1000
    assert not list(cache.folder.glob('*.cache'))


def test_a_cache_that_cannot_be_written_is_reported_and_the_run_goes_on(tmp_path, caplog):
    (tmp_path / 'cache').write_text('a file where the folder should be')
    cache, build = DataCache(tmp_path / 'cache', 1 << 20), Builder()
    with caplog.at_level(logging.WARNING, logger='solver.cache'):
        assert len(get(cache, build)['events']) == 100
    assert 'not written' in caplog.text


def test_the_files_digest_follows_names_and_bytes(tmp_path):
    for name in ('a.mid', 'b.mid'):
        (tmp_path / name).write_bytes(b'MThd' + name.encode())
    paths = sorted(tmp_path.iterdir())
    before = files_digest(tmp_path, paths)
    assert files_digest(tmp_path, paths) == before
    (tmp_path / 'b.mid').write_bytes(b'MThd' + b'c.mid')
    assert files_digest(tmp_path, paths) != before
    (tmp_path / 'b.mid').write_bytes(b'MThd' + b'b.mid')
    (tmp_path / 'b.mid').rename(tmp_path / 'c.mid')
    assert files_digest(tmp_path, sorted(tmp_path.iterdir())) != before


def test_the_config_turns_the_cache_off_or_places_it(tmp_path):
    cfg = OmegaConf.create({'cache': {'use': True, 'dir': None, 'max_mb': 2}})
    cache = from_config(cfg, tmp_path)
    assert cache is not None and cache.folder == tmp_path / 'cache' and cache.max_bytes == 2_000_000
    cfg.cache.dir = str(tmp_path / 'elsewhere')
    assert from_config(cfg, tmp_path).folder == tmp_path / 'elsewhere'  # type: ignore[union-attr]
    cfg.cache.use = False
    assert from_config(cfg, tmp_path) is None
