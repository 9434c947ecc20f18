"""The drum corpus: MIDI files under a folder, split by path hash and cut into event windows.

A file's split depends only on its path relative to the corpus root, so adding, removing or
reordering files never moves another file between train, valid and evaluate. Each usable file
becomes non-overlapping windows of `window_steps` steps starting at bar boundaries; a shorter
tail is kept only if it is at least `min_bars` bars long, the same bar as for a whole file
(Magenta's drums pipeline drops tracks under 7 bars). Windows therefore vary in length and
`collate` pads them.
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

from .encoding import NUM_EVENTS, SILENCE, STEPS_PER_BAR, check_events
from .midi import DrumFileError, read_drum_events

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
    """Windows and source files per split, and the files skipped with the reason for each."""

    root: Path
    window_steps: int
    windows: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    files: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    skipped: dict[str, str] = field(default_factory=dict)

    def dataset(self, split: str) -> DrumWindows:
        """The windows of one split as a torch Dataset."""
        if split not in self.windows:
            raise KeyError(f"unknown split {split!r}; the corpus has {SPLITS}")
        return DrumWindows(self.windows[split])

    def summary(self) -> str:
        """One line for the log: files and windows per split, files skipped."""
        parts = [f"{s}: {len(self.files[s])} files, {len(self.windows[s])} windows" for s in SPLITS]
        return f"drum corpus {self.root}: " + "; ".join(parts) + f"; skipped {len(self.skipped)} files"


def find_midi_files(root: Path) -> list[Path]:
    """MIDI files under `root`, recursively, sorted by relative path."""
    found = (p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(
    root: str | Path,
    min_bars: int = 7,
    window_steps: int = 512,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> Corpus:
    """Read every drum MIDI file under `root` into windows per split.

    Files that cannot be read, have no drums, are not in 4/4, or are shorter than `min_bars`
    bars are skipped with a warning. Raises NoDrumDataError if the train split ends up empty.
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
    for path in paths:
        relpath = path.relative_to(root).as_posix()
        try:
            events = read_drum_events(path)
        except DrumFileError as exc:
            _skip(corpus, relpath, exc.reason)
            continue
        bars = len(events) // STEPS_PER_BAR
        if bars < min_bars:
            _skip(corpus, relpath, f"too short: {bars} bars < dataset.min_bars={min_bars}")
            continue
        split = split_of(relpath, fractions)
        corpus.files[split].append(relpath)
        corpus.windows[split].extend(cut_windows(events, window_steps, min_bars * STEPS_PER_BAR))
    if not corpus.windows["train"]:
        raise NoDrumDataError(
            f"no usable drum data in {root}: found {len(paths)} MIDI files, skipped {len(corpus.skipped)}, "
            f"{sum(len(f) for f in corpus.files.values())} left and none in the train split; point "
            f"dataset.path at a folder of drum MIDI files (.mid/.midi, 4/4, channel-10 drums, "
            f"at least {min_bars} bars)"
        )
    return corpus


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
        self.windows = [check_events(w) for w in windows]

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
    counts = np.zeros(NUM_EVENTS, dtype=np.int64)
    for window in windows:
        events = check_events(window.numpy() if isinstance(window, torch.Tensor) else window)
        counts += np.bincount(events, minlength=NUM_EVENTS)
    return counts
