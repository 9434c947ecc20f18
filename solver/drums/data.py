"""The drum corpus: MIDI files under a folder, split by path hash and cut into event windows.

A file's split depends only on its path relative to the corpus root, so adding, removing or
reordering files never moves another file between train, valid and evaluate. Each usable 4/4
section of a file becomes non-overlapping windows of `window_steps` steps starting at bar
boundaries; a shorter tail is kept only if it is at least `min_bars` bars long, the same bar as
for a whole section (Magenta's drums pipeline drops tracks under 7 bars). Windows therefore
vary in length and `collate` pads them.

A small collection (a few songs) would leave a split empty or far from its fraction when split
by file: then bar-aligned sections are split instead (`split_sections`), so that any folder with
a usable file trains. Held-out sections then come from the same songs as the training ones.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch

from ..cache import DataCache
from . import track_cache
from .encoding import NUM_EVENTS, SILENCE, STEPS_PER_BAR, check_events
from .midi import DrumFileError, DrumTrack, read_drum_track

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "evaluate")
MIDI_SUFFIXES = (".mid", ".midi")
IGNORE_INDEX = -100  # target value at padded positions, as torch's cross_entropy expects


class NoDrumDataError(ValueError):
    """The dataset folder gives no training windows; the message says what to point it at."""


def split_of(relpath: str | PurePath, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """'train', 'valid' or 'evaluate' for a file, from a SHA-256 of its posix relative path.

    A stable hash (not Python's salted `hash`) keeps the assignment the same across runs,
    machines and folder listing orders.
    """
    _check_fractions(fractions)
    key = relpath.as_posix() if isinstance(relpath, PurePath) else PurePosixPath(relpath).as_posix()
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if position < edge:
            return name
    return SPLITS[-1]  # float rounding at the top edge


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must be {len(SPLITS)} non-negative numbers for {SPLITS} summing to 1, "
            f"got {tuple(fractions)}"
        )


def cut_windows(events: np.ndarray, window_steps: int, min_steps: int) -> list[np.ndarray]:
    """Non-overlapping windows of `window_steps` from step 0, plus the tail if >= `min_steps`."""
    windows = [events[start : start + window_steps] for start in range(0, len(events), window_steps)]
    return [w for w in windows if len(w) >= min(min_steps, window_steps)]


@dataclass
class Corpus:
    """Windows and source files per split, the bars used and skipped, and the files skipped.

    `split_by` is 'file' (each file in one split, by the hash of its path) or 'section' (a
    small collection: bar-aligned sections of `section_bars` bars, each in one split).
    """

    root: Path
    window_steps: int
    windows: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    # The same music uncut: whole sections (by file) or the pieces (by section), for statistics
    # over more bars than a window holds (the groove report's repetitions).
    sections: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    files: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    skipped: dict[str, str] = field(default_factory=dict)
    skipped_bars: dict[str, int] = field(default_factory=dict)
    split_by: str = "file"
    section_bars: int = 0

    def dataset(self, split: str) -> DrumWindows:
        """The windows of one split as a torch Dataset."""
        if split not in self.windows:
            raise KeyError(f"unknown split {split!r}; the corpus has {SPLITS}")
        return DrumWindows(self.windows[split])

    def bars(self, split: str) -> int:
        return sum(len(w) for w in self.windows[split]) // STEPS_PER_BAR

    def summary(self) -> str:
        """One line for the log: files, windows and bars per split; bars and files skipped, and why."""
        how = "by file" if self.split_by == "file" else f"by sections of {self.section_bars} bars"
        parts = [f"{s}: {len(self.files[s])} files, {len(self.windows[s])} windows, {self.bars(s)} bars"
                 for s in SPLITS]
        why = ", ".join(f"{reason}: {bars}" for reason, bars in sorted(self.skipped_bars.items()))
        used = sum(self.bars(s) for s in SPLITS)
        return (f"drum corpus {self.root}, split {how}: " + "; ".join(parts)
                + f"; bars used {used}, skipped {sum(self.skipped_bars.values())}" + (f" ({why})" if why else "")
                + f"; files skipped {len(self.skipped)}")


def find_midi_files(root: Path) -> list[Path]:
    """MIDI files under `root`, recursively (any nesting, as the Groove MIDI Dataset's
    drummer/session folders), sorted by relative path."""
    found = (p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(
    root: str | Path,
    min_bars: int = 7,
    window_steps: int = 512,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    cache: DataCache | None = None,
) -> Corpus:
    """Read every drum MIDI file under `root` into windows per split.

    Each file gives its 4/4 sections (see `midi.read_drum_track`); sections shorter than
    `min_bars` bars and the bars of other meters are skipped and counted, and a file is skipped
    (with a warning) only when nothing in it is usable. Files go to splits by the hash of their
    path; when that would leave a split empty or far from its fraction (a small collection),
    bar-aligned sections go to splits instead (`split_sections`). Raises NoDrumDataError if
    nothing is usable. With a `cache`, the parsed files come from it when the files are the same
    (`track_cache`): only the cutting into windows and splits, which is cheap, runs again.
    """
    if window_steps <= 0 or window_steps % STEPS_PER_BAR:
        raise ValueError(
            f"dataset.window_steps={window_steps} must be a positive multiple of {STEPS_PER_BAR} "
            f"(one bar) so that windows start on bar lines"
        )
    if min_bars < 1:
        raise ValueError(f"dataset.min_bars={min_bars} must be at least 1")
    _check_fractions(fractions)
    root = Path(root)
    if not root.is_dir():
        raise NoDrumDataError(
            f"dataset.path {root} is not an existing folder; point dataset.path at a folder of "
            f"drum MIDI files (.mid/.midi with a channel-10 drum track)"
        )
    corpus = Corpus(root=root, window_steps=window_steps)
    paths = find_midi_files(root)
    tracks = parse_files(root, paths) if cache is None else track_cache.get(cache, root, paths, parse_files)
    usable = read_sections(corpus, tracks, min_bars)
    if not usable:
        raise NoDrumDataError(
            f"no usable drum data in {root}: found {len(paths)} MIDI files, skipped {len(corpus.skipped)}; "
            f"point dataset.path at a folder of drum MIDI files (.mid/.midi, channel-10 drums, "
            f"at least {min_bars} bars in 4/4 or 2/2)"
        )
    read_skips = dict(corpus.skipped_bars)  # tails are counted by the split that cuts them
    min_steps = min_bars * STEPS_PER_BAR
    by_file = {relpath: split_of(relpath, fractions) for relpath in usable}
    for relpath, sections in usable.items():
        _add(corpus, by_file[relpath], relpath, sections, window_steps, min_steps)
    if not _far_from(corpus, fractions):
        return corpus
    file_bars = {s: corpus.bars(s) for s in SPLITS}
    sectioned = Corpus(root=root, window_steps=window_steps, skipped=corpus.skipped, skipped_bars=read_skips,
                       split_by="section")
    split_sections(sectioned, usable, window_steps, min_bars, fractions)
    logger.info("drum corpus %s is small: a split by file gives %s bars for fractions %s, so sections of "
                "%d bars go to splits instead: %s bars", root, "/".join(str(file_bars[s]) for s in SPLITS),
                "/".join(f"{f:g}" for f in fractions), sectioned.section_bars,
                "/".join(str(sectioned.bars(s)) for s in SPLITS))
    return sectioned


def parse_files(root: Path, paths: Sequence[Path]) -> dict[str, DrumTrack | str]:
    """Each file's drum track, or why it has none, by path relative to `root`: the MIDI parsing,
    which is what `load_corpus` spends its time on (and what the data cache keeps)."""
    tracks: dict[str, DrumTrack | str] = {}
    for path in paths:
        relpath = path.relative_to(root).as_posix()
        try:
            tracks[relpath] = read_drum_track(path)
        except DrumFileError as exc:
            tracks[relpath] = exc.reason
    return tracks


def read_sections(corpus: Corpus, tracks: dict[str, DrumTrack | str], min_bars: int) -> dict[str, list[np.ndarray]]:
    """The sections of at least `min_bars` bars of each readable file, by relative path.

    Bars left out of a usable file are counted in `corpus.skipped_bars` by reason; a file with
    nothing usable is recorded in `corpus.skipped` with the reason instead.
    """
    usable: dict[str, list[np.ndarray]] = {}
    for relpath, track in tracks.items():
        if isinstance(track, str):
            _skip(corpus, relpath, track)
            continue
        long_enough = [s for s in track.sections if len(s) >= min_bars * STEPS_PER_BAR]
        short = [len(s) // STEPS_PER_BAR for s in track.sections if len(s) < min_bars * STEPS_PER_BAR]
        if not long_enough:
            where = "" if len(short) == 1 else f" (4/4 sections of {short} bars)"
            _skip(corpus, relpath, f"too short: {max(short)} bars < dataset.min_bars={min_bars}{where}")
            continue
        for reason, bars in track.skipped_bars.items():  # a skipped file counts as a file, not bars
            _count(corpus, reason, bars)
        _count(corpus, f"4/4 section under dataset.min_bars={min_bars}", sum(short))
        usable[relpath] = long_enough
    return usable


def split_sections(corpus: Corpus, usable: dict[str, list[np.ndarray]], window_steps: int,
                   min_bars: int, fractions: Sequence[float]) -> None:
    """Put bar-aligned sections of the files into splits, in the asked proportions.

    Sections are `window_steps` long, or shorter (min_bars bars, then 2, then 1) when there are
    too few for every split with a non-zero fraction to get one. Their order is a SHA-256 of
    (path, section start), so the assignment is deterministic and spread over the files: the
    first round(fraction * n) (at least one) go to valid, the next to evaluate, the rest to train.
    """
    needed = sum(1 for f in fractions if f > 0)
    window_bars = window_steps // STEPS_PER_BAR
    candidates = sorted({window_bars, min(min_bars, window_bars), min(2, window_bars), 1}, reverse=True)
    for bars in candidates:
        sections = [(relpath, start, piece) for relpath, runs in usable.items()
                    for run, events in enumerate(runs)
                    for start, piece in _pieces(events, bars * STEPS_PER_BAR, min(min_bars, bars) * STEPS_PER_BAR,
                                                run)]
        if len(sections) >= needed:
            break
    else:
        total = sum(len(e) for runs in usable.values() for e in runs) // STEPS_PER_BAR
        raise NoDrumDataError(
            f"only {total} usable bars of drums in {corpus.root}: train, valid and evaluate need one bar "
            f"each at least; add files or set dataset.splits (e.g. [1, 0, 0] trains without held-out data)")
    corpus.section_bars = bars
    sections.sort(key=lambda item: hashlib.sha256(f"{item[0]}@{item[1]}".encode()).digest())
    quotas = [max(1, round(f * len(sections))) if f > 0 else 0 for f in fractions[1:]]
    edges = {"valid": (0, quotas[0]), "evaluate": (quotas[0], quotas[0] + quotas[1]),
             "train": (quotas[0] + quotas[1], len(sections))}
    for split, (begin, end) in edges.items():
        chosen = sorted(sections[begin:end], key=lambda item: (item[0], item[1]))  # file order, as by file
        for relpath, _, piece in chosen:
            if relpath not in corpus.files[split]:
                corpus.files[split].append(relpath)
            corpus.windows[split].append(piece)
            corpus.sections[split].append(piece)
    dropped = sum(len(e) for runs in usable.values() for e in runs) - sum(len(p) for _, _, p in sections)
    _count(corpus, f"tail under dataset.min_bars={min_bars}", dropped // STEPS_PER_BAR)


def _pieces(events: np.ndarray, steps: int, min_steps: int, run: int) -> list[tuple[int, np.ndarray]]:
    """(a key unique in the file, piece) for the bar-aligned pieces of one section of a file."""
    return [(run * MAX_STEPS + start, events[start:start + steps])
            for start in range(0, len(events), steps) if len(events[start:start + steps]) >= min(min_steps, steps)]


MAX_STEPS = 1 << 32  # above any section's length: (run, start) as one integer key


def _add(corpus: Corpus, split: str, relpath: str, sections: list[np.ndarray], window_steps: int,
         min_steps: int) -> None:
    corpus.files[split].append(relpath)
    for events in sections:
        windows = cut_windows(events, window_steps, min_steps)
        corpus.windows[split].extend(windows)
        if windows:
            corpus.sections[split].append(events[:sum(len(w) for w in windows)])
        _count(corpus, f"tail under dataset.min_bars={min_steps // STEPS_PER_BAR}",
               (len(events) - sum(len(w) for w in windows)) // STEPS_PER_BAR)


def _far_from(corpus: Corpus, fractions: Sequence[float]) -> bool:
    """Whether a split's share of the bars is empty or off its fraction by more than a factor 2."""
    total = sum(corpus.bars(s) for s in SPLITS)
    for split, fraction in zip(SPLITS, fractions):
        share = corpus.bars(split) / total
        if fraction > 0 and not fraction / 2 <= share <= 2 * fraction:
            return True
    return False


def _count(corpus: Corpus, reason: str, bars: int) -> None:
    if bars:
        corpus.skipped_bars[reason] = corpus.skipped_bars.get(reason, 0) + bars


def _skip(corpus: Corpus, relpath: str, reason: str) -> None:
    logger.warning("skipping drum file %s: %s", corpus.root / relpath, reason)
    corpus.skipped[relpath] = reason


class DrumBatch(NamedTuple):
    """A padded batch: `events` [B, T] int64 (padding is SILENCE) and true `lengths` [B]."""

    events: torch.Tensor
    lengths: torch.Tensor


class DrumWindows(torch.utils.data.Dataset):
    """Event windows as int64 tensors; pass `collate` to the DataLoader to batch them."""

    def __init__(self, windows: Sequence[np.ndarray]):
        if len(windows):
            check_events(np.concatenate(windows))  # all at once: a check per window costs seconds on a large corpus
        self.windows = [np.asarray(w).astype(np.int64, copy=False) for w in windows]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.windows[index])

    @staticmethod
    def collate(items: Sequence[torch.Tensor]) -> DrumBatch:
        return collate(items)


def collate(items: Sequence[torch.Tensor]) -> DrumBatch:
    """Pad windows to the longest with SILENCE and keep their lengths.

    Padding is a valid event so a model can embed the whole batch; `next_step_targets` turns
    the padded steps into IGNORE_INDEX targets so the loss skips them.
    """
    lengths = torch.tensor([len(item) for item in items], dtype=torch.int64)
    events = torch.full((len(items), int(lengths.max())), SILENCE, dtype=torch.int64)
    for row, item in enumerate(items):
        events[row, : len(item)] = item
    return DrumBatch(events, lengths)


def next_step_targets(batch: DrumBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs `events[:, :-1]` and targets `events[:, 1:]`, targets past each length IGNORE_INDEX."""
    inputs, targets = batch.events[:, :-1], batch.events[:, 1:].clone()
    steps = torch.arange(targets.shape[1], device=targets.device)
    targets[steps[None, :] + 1 >= batch.lengths[:, None]] = IGNORE_INDEX
    return inputs, targets


def event_frequencies(windows: Iterable[np.ndarray | torch.Tensor]) -> np.ndarray:
    """Count of each of the NUM_EVENTS events over all windows (for a unigram baseline)."""
    arrays = [window.numpy() if isinstance(window, torch.Tensor) else np.asarray(window) for window in windows]
    events = check_events(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.int64)
    return np.bincount(events, minlength=NUM_EVENTS).astype(np.int64)
