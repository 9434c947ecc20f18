"""The drum corpus through the data cache: the same corpus as a fresh parse, parsed again exactly
when a file or a parse setting changes, and used by a resumed `dora run`."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import BackgroundRun, run_dora

from solver.cache import DataCache
from solver.drums import data, track_cache
from solver.drums.data import SPLITS, load_corpus

BUNDLED = Path(__file__).resolve().parents[2] / 'data' / 'drums'


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Twelve files of the bundled corpus in two styles, and one that is not MIDI."""
    root = tmp_path / 'corpus'
    for style in ('funk', 'reggae'):
        (root / style).mkdir(parents=True)
        for path in sorted((BUNDLED / style).glob('*.mid'))[:6]:
            shutil.copy(path, root / style / path.name)
    (root / 'funk' / 'notes.mid').write_bytes(b'not a MIDI file')
    return root


class Parses:
    """Counts the parses `load_corpus` makes (`data.parse_files`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, parse = 0, data.parse_files

        def counted(root, paths):
            self.count += 1
            return parse(root, paths)

        monkeypatch.setattr(data, 'parse_files', counted)


def assert_same_corpus(a: data.Corpus, b: data.Corpus) -> None:
    assert (a.files, a.skipped, a.skipped_bars, a.split_by, a.section_bars) == \
        (b.files, b.skipped, b.skipped_bars, b.split_by, b.section_bars)
    for split in SPLITS:
        for field in ('windows', 'sections'):
            mine, theirs = getattr(a, field)[split], getattr(b, field)[split]
            assert len(mine) == len(theirs)
            assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(mine, theirs))


@pytest.mark.parametrize('settings', [{'min_bars': 4, 'window_steps': 64},
                                      {'min_bars': 2, 'window_steps': 32, 'fractions': (0.6, 0.2, 0.2)}])
def test_a_corpus_from_the_cache_is_the_corpus_parsed_again(tmp_path, corpus, monkeypatch, settings):
    cache, parses = DataCache(tmp_path / 'cache', 1 << 30), Parses(monkeypatch)
    load_corpus(corpus, min_bars=8, window_steps=128, cache=cache)  # fills the cache
    cached = load_corpus(corpus, cache=cache, **settings)  # other settings: the same parse
    assert parses.count == 1
    assert_same_corpus(cached, load_corpus(corpus, **settings))
    assert cached.skipped == {'funk/notes.mid': cached.skipped['funk/notes.mid']} and cached.skipped['funk/notes.mid']


@pytest.mark.parametrize('change', ['a changed file', 'an added file', 'a removed file', 'a renamed file'])
def test_a_change_in_the_files_parses_them_again(tmp_path, corpus, monkeypatch, change):
    cache, parses = DataCache(tmp_path / 'cache', 1 << 30), Parses(monkeypatch)
    load_corpus(corpus, min_bars=4, window_steps=64, cache=cache)
    first = sorted((corpus / 'reggae').glob('*.mid'))[0]
    if change == 'a changed file':
        shutil.copy(sorted((corpus / 'funk').glob('*.mid'))[0], first)
    elif change == 'an added file':
        shutil.copy(sorted((BUNDLED / 'rock').glob('*.mid'))[0], corpus / 'reggae' / 'new.mid')
    elif change == 'a removed file':
        first.unlink()
    else:
        first.rename(first.with_name('renamed.mid'))
    cached = load_corpus(corpus, min_bars=4, window_steps=64, cache=cache)
    assert parses.count == 2
    assert_same_corpus(cached, load_corpus(corpus, min_bars=4, window_steps=64))


@pytest.mark.parametrize('setting', ['STEPS_PER_QUARTER', 'DRUM_PITCHES', 'MAX_BARS'])
def test_a_change_in_what_shapes_a_parse_parses_again(tmp_path, corpus, monkeypatch, setting):
    cache, parses = DataCache(tmp_path / 'cache', 1 << 30), Parses(monkeypatch)
    load_corpus(corpus, min_bars=4, window_steps=64, cache=cache)
    changed = {'STEPS_PER_QUARTER': 8, 'DRUM_PITCHES': ((36,),), 'MAX_BARS': 5}[setting]
    monkeypatch.setattr(track_cache, setting, changed)
    load_corpus(corpus, min_bars=4, window_steps=64, cache=cache)
    assert parses.count == 2


@pytest.mark.integration
def test_a_resumed_run_reads_the_corpus_from_the_cache(tmp_path):
    """`dora run`, stopped after its first step (SIGTERM: saved), then run again: the rerun resumes
    and takes the parsed corpus from the cache the first run wrote, and says where its start went."""
    overrides = ('solver=drum_rnn/debug', 'optim.epochs=1')
    with BackgroundRun(tmp_path / 'dora', *overrides) as first:
        first.wait_for_line('Startup: ')
        first.send(signal.SIGTERM)
        code, output = first.finish()
    assert code == 128 + signal.SIGTERM and 'Cached in ' in output, output[-3000:]
    (entry,) = (tmp_path / 'dora' / 'cache').glob('drum-tracks-*.cache')
    code, output = run_dora(tmp_path / 'dora', 'run', *overrides)
    assert code == 0, output[-3000:]
    assert f'Read drum-tracks from the data cache {entry}' in output and 'Resumed from' in output
    (line,) = [line for line in output.splitlines() if 'Startup: ' in line]
    for phase in ('imports', 'config', 'data', 'model', 'state', 'first step'):
        assert f' {phase} ' in line
