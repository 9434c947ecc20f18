"""The parsed drum files in the data cache (`solver.cache`): their key and their stored form.

What is cached is the costly part of loading a corpus, each file's `DrumTrack` (or the reason it
has none), not the windows: the cutting into windows and splits is cheap and runs on every load,
so experiments that differ in `dataset.window_steps`, `min_bars` or `splits` share one entry.
The key holds what shapes a parse: the files' names and bytes, the steps per quarter, the pitch
map, the bar limit, the version of symusic and the source of the modules that parse, so that a
change to any of them parses again.
"""

from __future__ import annotations

import typing as tp
from importlib.metadata import version
from pathlib import Path

import numpy as np
import xxhash

from ..cache import DataCache, Entry, files_digest
from . import encoding, midi
from .encoding import DRUM_PITCHES, NUM_EVENTS, STEPS_PER_QUARTER
from .midi import MAX_BARS, DrumTrack

NAME = 'drum-tracks'
Tracks = dict[str, 'DrumTrack | str']  # relative path -> track, or why the file gives none
Parse = tp.Callable[[Path, tp.Sequence[Path]], Tracks]


def get(cache: DataCache, root: Path, paths: tp.Sequence[Path], parse: Parse) -> Tracks:
    """The tracks of `paths` (under `root`) from `cache`, else `parse(root, paths)`, then cached."""
    return cache.get(NAME, key(root, paths), lambda: parse(root, paths), CODEC)


def key(root: Path, paths: tp.Sequence[Path]) -> dict[str, tp.Any]:
    """Everything that shapes the parsed tracks of these files."""
    code = xxhash.xxh3_128()
    for module in (midi, encoding):
        code.update(Path(str(module.__file__)).read_bytes())
    code.update(Path(__file__).read_bytes())
    return {'files': files_digest(root, paths), 'count': len(paths), 'steps_per_quarter': STEPS_PER_QUARTER,
            'pitches': [list(p) for p in DRUM_PITCHES], 'max_bars': MAX_BARS, 'symusic': version('symusic'),
            'code': code.hexdigest()}


class TrackCodec:
    """Tracks as one uint16 array of every section's events, the sections' lengths, and per file
    (in `info`): its path, the reason it has no track or its number of sections, tempo and
    skipped bars."""

    def encode(self, tracks: Tracks) -> Entry:
        sections = [s for t in tracks.values() if not isinstance(t, str) for s in t.sections]
        files = [[relpath, t] if isinstance(t, str) else [relpath, len(t.sections), t.qpm, t.skipped_bars]
                 for relpath, t in tracks.items()]
        events = np.concatenate(sections).astype(np.uint16) if sections else np.zeros(0, np.uint16)
        return Entry({'events': events, 'lengths': np.array([len(s) for s in sections], np.int64)},
                     {'files': files})

    def decode(self, entry: Entry) -> Tracks:
        events, lengths = entry.arrays['events'], entry.arrays['lengths']
        if events.dtype != np.uint16 or lengths.dtype != np.int64 or events.ndim != 1 or lengths.ndim != 1:
            raise ValueError("arrays of the wrong type")
        if (lengths < 0).any() or int(lengths.sum()) != len(events) or (events >= NUM_EVENTS).any():
            raise ValueError("section lengths or events out of range")
        files = entry.info['files']
        if sum(int(f[1]) for f in files if not isinstance(f[1], str)) != len(lengths):
            raise ValueError("the files name another number of sections than stored")
        pieces = iter(np.split(events.astype(np.int64), np.cumsum(lengths)[:-1]) if len(lengths) else [])
        tracks: Tracks = {}
        for file in files:
            if isinstance(file[1], str):
                tracks[str(file[0])] = file[1]
                continue
            relpath, count, qpm, skipped = file
            sections = [next(pieces) for _ in range(int(count))]
            tracks[str(relpath)] = DrumTrack(sections, {str(k): int(v) for k, v in skipped.items()}, float(qpm))
        return tracks


CODEC = TrackCodec()
