"""Specification of the drum corpus: hash splits, skipped files, windows, batches and counts."""

import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath

import mido
import numpy as np
import pytest
import torch

from solver.drums.data import (
    IGNORE_INDEX,
    SPLITS,
    DrumWindows,
    NoDrumDataError,
    collate,
    cut_windows,
    event_frequencies,
    load_corpus,
    next_step_targets,
    split_of,
)
from solver.drums.midi import write_drum_midi

ALL_TRAIN = (1.0, 0.0, 0.0)


def drum_events(bars, seed=0):
    """Random events over `bars` bars with a hit on the first and last step, as read back."""
    events = np.random.default_rng(seed).integers(0, 512, size=bars * 16)
    events[0] = events[-1] = 1
    return events


def write_drums(path, bars, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_drum_midi(drum_events(bars, seed), path)
    return path


def test_split_is_a_pure_function_of_the_posix_relative_path():
    name = "rock/album 1/take_03.mid"
    assert split_of(name) in SPLITS
    assert split_of(name) == split_of(PurePosixPath(name)) == split_of("./" + name)
    assert split_of(PureWindowsPath("rock\\album 1\\take_03.mid")) == split_of(name)


def test_splits_follow_the_fractions_over_many_files():
    counts = Counter(split_of(f"artist_{i % 37}/song_{i}.mid") for i in range(20_000))
    assert counts["train"] / 20_000 == pytest.approx(0.8, abs=0.02)
    assert counts["valid"] / 20_000 == pytest.approx(0.1, abs=0.02)
    assert counts["evaluate"] / 20_000 == pytest.approx(0.1, abs=0.02)
    assert {split_of(f"x{i}.mid", ALL_TRAIN) for i in range(100)} == {"train"}


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.1, 0.2), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_rejected(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_of("a.mid", fractions)


def test_corpus_files_keep_their_split_whatever_else_is_in_the_folder(tmp_path):
    names = [f"{folder}/groove_{i}.mid" for folder in "zab" for i in range(8)]
    for i, name in enumerate(reversed(names)):  # written in another order than listed
        write_drums(tmp_path / name, bars=8, seed=i)
    fractions = (0.6, 0.2, 0.2)  # 24 files: every split's share within a factor 2 of its fraction
    before = load_corpus(tmp_path, min_bars=4, fractions=fractions)
    write_drums(tmp_path / "a" / "new.mid", bars=8)
    after = load_corpus(tmp_path, min_bars=4, fractions=fractions)
    assert before.split_by == after.split_by == "file"
    for split in SPLITS:
        assert before.files[split] == [n for n in sorted(names) if split_of(n, fractions) == split]
        assert set(before.files[split]) <= set(after.files[split])


def test_midi_files_are_found_recursively_by_suffix(tmp_path):
    for name in ["a.mid", "deep/er/b.MIDI", "c.midi"]:
        write_drums(tmp_path / name, bars=8)
    (tmp_path / "readme.txt").write_text("not a drum file")
    corpus = load_corpus(tmp_path, min_bars=4, fractions=ALL_TRAIN)
    assert corpus.files["train"] == ["a.mid", "c.midi", "deep/er/b.MIDI"]
    assert corpus.skipped == {}


def test_unusable_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    write_drums(tmp_path / "good.mid", bars=8)
    (tmp_path / "text.mid").write_text("MThd? no, a shopping list\n")
    (tmp_path / "truncated.mid").write_bytes((tmp_path / "good.mid").read_bytes()[:40])
    write_drum_midi(np.zeros(16, dtype=np.int64), tmp_path / "silent.mid")
    write_drums(tmp_path / "short.mid", bars=2)
    with caplog.at_level(logging.WARNING, logger="solver.drums.data"):
        corpus = load_corpus(tmp_path, min_bars=4, fractions=ALL_TRAIN)
    assert corpus.files["train"] == ["good.mid"]
    assert sorted(corpus.skipped) == ["short.mid", "silent.mid", "text.mid", "truncated.mid"]
    assert "not a readable MIDI file" in corpus.skipped["text.mid"]
    assert "not a readable MIDI file" in corpus.skipped["truncated.mid"]
    assert "no drum" in corpus.skipped["silent.mid"]  # symusic writes no empty track
    assert "2 bars < dataset.min_bars=4" in corpus.skipped["short.mid"]
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in corpus.skipped:
        assert str(tmp_path / name) in warned


def test_midi_without_drums_is_skipped(tmp_path, caplog):
    write_drums(tmp_path / "drums.mid", bars=8)
    piano = mido.MidiFile()
    note = [mido.Message("note_on", note=60, time=0), mido.Message("note_off", note=60, time=480)]
    piano.tracks.append(mido.MidiTrack(note))
    piano.save(tmp_path / "piano.mid")
    with caplog.at_level(logging.WARNING):
        corpus = load_corpus(tmp_path, min_bars=4, fractions=ALL_TRAIN)
    assert "no drum track" in corpus.skipped["piano.mid"]
    assert "piano.mid" in caplog.text


def test_long_files_are_cut_into_bar_aligned_windows_keeping_long_enough_tails(tmp_path):
    write_drums(tmp_path / "forty.mid", bars=40, seed=1)  # 32 + 8 bars: tail kept
    write_drums(tmp_path / "thirtyfive.mid", bars=35, seed=2)  # 32 + 3 bars: tail dropped
    corpus = load_corpus(tmp_path, min_bars=7, window_steps=512, fractions=ALL_TRAIN)
    assert [len(w) for w in corpus.windows["train"]] == [512, 128, 512]
    np.testing.assert_array_equal(corpus.windows["train"][1], drum_events(40, seed=1)[512:])


def test_cut_windows_start_on_window_boundaries():
    events = np.arange(100)
    assert [w[0] for w in cut_windows(events, 32, 16)] == [0, 32, 64]  # tail of 4 dropped
    assert [len(w) for w in cut_windows(events, 32, 4)] == [32, 32, 32, 4]
    assert [len(w) for w in cut_windows(events, 32, 64)] == [32, 32, 32]  # full windows always kept


@pytest.mark.parametrize("window_steps", [0, 100, -16])
def test_window_steps_must_be_whole_bars(tmp_path, window_steps):
    with pytest.raises(ValueError, match="dataset.window_steps"):
        load_corpus(tmp_path, window_steps=window_steps)


def test_empty_folder_raises_no_drum_data(tmp_path):
    with pytest.raises(NoDrumDataError, match=r"found 0 MIDI files.*dataset\.path"):
        load_corpus(tmp_path)


def test_missing_folder_raises_no_drum_data(tmp_path):
    with pytest.raises(NoDrumDataError, match=r"nowhere.*dataset\.path"):
        load_corpus(tmp_path / "nowhere")


def test_folder_of_only_bad_files_raises_no_drum_data_with_counts(tmp_path):
    (tmp_path / "a.mid").write_text("junk")
    write_drums(tmp_path / "b.mid", bars=2)
    with pytest.raises(NoDrumDataError, match="found 2 MIDI files, skipped 2"):
        load_corpus(tmp_path, min_bars=4)


def test_dataset_items_are_int64_event_tensors(tmp_path):
    write_drums(tmp_path / "a.mid", bars=8)
    dataset = load_corpus(tmp_path, min_bars=4, window_steps=64, fractions=ALL_TRAIN).dataset("train")
    assert len(dataset) == 2
    assert dataset[0].dtype == torch.int64 and dataset[0].shape == (64,)
    with pytest.raises(KeyError, match="test"):
        load_corpus(tmp_path, min_bars=4, fractions=ALL_TRAIN).dataset("test")


def test_collate_pads_with_silence_and_returns_lengths():
    dataset = DrumWindows([np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8])])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=DrumWindows.collate)
    events, lengths = next(iter(loader))
    assert events.tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]
    assert lengths.tolist() == [3, 5]


def test_windows_with_foreign_events_are_refused_whichever_window_holds_them():
    for windows in ([np.array([513, 1])], [np.array([1, 2]), np.array([3, -1])]):
        with pytest.raises(ValueError, match="out of range"):
            DrumWindows(windows)
    with pytest.raises(ValueError, match="integers"):
        DrumWindows([np.array([1, 2]), np.array([0.5])])
    assert all(w.dtype == np.int64 for w in DrumWindows([np.array([1, 2], dtype=np.uint16)]).windows)


def test_next_step_targets_ignore_padding():
    batch = collate([torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])])
    inputs, targets = next_step_targets(batch)
    assert inputs.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert targets.tolist() == [[2, 3, IGNORE_INDEX, IGNORE_INDEX], [5, 6, 7, 8]]
    loss = torch.nn.functional.cross_entropy(torch.zeros(2, 512, 4), targets, ignore_index=IGNORE_INDEX)
    assert torch.isfinite(loss)


def test_event_frequencies_count_every_step():
    counts = event_frequencies([np.array([0, 0, 5]), torch.tensor([5, 511])])
    assert counts.shape == (512,)
    assert (counts[0], counts[5], counts[511], counts.sum()) == (2, 2, 1, 5)


def test_event_frequencies_reject_foreign_events():
    with pytest.raises(ValueError, match="out of range"):
        event_frequencies([np.array([0, 512])])


# -- small and messy collections ------------------------------------------------------------------

def test_a_few_songs_are_split_by_sections_in_every_split(tmp_path, caplog):
    for i in range(7):
        write_drums(tmp_path / f"song_{i}.mid", bars=40, seed=i)
    with caplog.at_level(logging.INFO, logger="solver.drums.data"):
        corpus = load_corpus(tmp_path, min_bars=4, window_steps=64)
    assert corpus.split_by == "section" and corpus.section_bars == 4
    assert [len(corpus.windows[s]) for s in SPLITS] == [56, 7, 7]  # 70 sections: 10% each held out
    assert "is small" in caplog.text and "sections of 4 bars" in corpus.summary()
    again = load_corpus(tmp_path, min_bars=4, window_steps=64)
    for split in SPLITS:
        assert all(np.array_equal(a, b) for a, b in zip(corpus.windows[split], again.windows[split]))


def _starts(corpus):
    """Memory address of each window: windows are views into their file's events."""
    return [w.__array_interface__["data"][0] for split in SPLITS for w in corpus.windows[split]]


def test_sections_are_disjoint_and_cover_the_file(tmp_path):
    write_drums(tmp_path / "only.mid", bars=12, seed=3)
    corpus = load_corpus(tmp_path, min_bars=4, window_steps=64)
    assert corpus.split_by == "section" and corpus.section_bars == 4
    assert [corpus.bars(s) for s in SPLITS] == [4, 4, 4]
    assert len(set(_starts(corpus))) == 3
    whole = np.concatenate(sorted((w for s in SPLITS for w in corpus.windows[s]),
                                  key=lambda w: w.__array_interface__["data"][0]))
    np.testing.assert_array_equal(whole, drum_events(12, seed=3))


def test_a_one_file_folder_of_min_bars_trains_on_shorter_sections(tmp_path):
    write_drums(tmp_path / "four_bars.mid", bars=4)
    corpus = load_corpus(tmp_path, min_bars=4, window_steps=64)
    assert corpus.section_bars == 1  # 4 bars of 4 or 2 give fewer than 3 sections
    assert [corpus.bars(s) for s in SPLITS] == [2, 1, 1]


def test_too_few_bars_for_three_splits_is_a_clear_error(tmp_path):
    write_drums(tmp_path / "two_bars.mid", bars=2)
    with pytest.raises(NoDrumDataError, match=r"only 2 usable bars.*dataset\.splits"):
        load_corpus(tmp_path, min_bars=1, window_steps=64)
    assert load_corpus(tmp_path, min_bars=1, window_steps=64, fractions=ALL_TRAIN).bars("train") == 2


def test_a_messy_nested_collection_reads_what_is_usable_and_says_what_it_skipped(tmp_path, band_song):
    # The Groove MIDI Dataset's layout: drummer/session/<id>_<style>_<bpm>_<beat|fill>_<meter>.mid
    band_song(tmp_path / "drummer1/session1/1_funk_92_beat_4-4.mid", intro_bars=2, groove_bars=12)
    band_song(tmp_path / "drummer1/session2/2_rock_104_beat_4-4.mid", intro_bars=1, groove_bars=9, seed=1)
    band_song(tmp_path / "drummer2/eval_session/3_jazz_92_fill_4-4.mid", intro_bars=3, groove_bars=2)
    waltz = tmp_path / "drummer2/eval_session/4_waltz_92_beat_3-4.mid"
    band_song(waltz, intro_bars=4, groove_bars=0)  # nothing but 3/4
    corpus = load_corpus(tmp_path, min_bars=4, window_steps=64)
    assert sorted(corpus.skipped) == ["drummer2/eval_session/3_jazz_92_fill_4-4.mid",
                                      "drummer2/eval_session/4_waltz_92_beat_3-4.mid"]
    assert "too short: 2 bars" in corpus.skipped["drummer2/eval_session/3_jazz_92_fill_4-4.mid"]
    assert "4 bars in time signature 3/4" in corpus.skipped["drummer2/eval_session/4_waltz_92_beat_3-4.mid"]
    # bars left out of the two usable songs: their 3/4 intros, and one bar after two 4-bar sections
    assert corpus.skipped_bars == {"time signature 3/4": 2 + 1, "tail under dataset.min_bars=4": 1}
    assert sum(corpus.bars(s) for s in SPLITS) == 12 + 8
    line = corpus.summary()
    assert "bars used 20, skipped 4 (tail under dataset.min_bars=4: 1, time signature 3/4: 3)" in line
    assert "files skipped 2" in line
    # the groove reads as written: kick on 1 and 3, snare on 2 and 4, hats on 8ths; no bass as snare
    first_bars = next(w for s in SPLITS for w in corpus.windows[s] if len(w) and w[4] == 2 + 4)
    assert first_bars[0] & 1 and first_bars[4] == 2 + 4 and first_bars[8] & 1 and first_bars[12] == 2 + 4


def test_the_small_set_script_writes_a_messy_collection_that_trains(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_small_drum_set.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.mid"))
    assert len(files) == 7 and all(f.startswith("drummer") and f.count("/") == 2 for f in files)
    assert all(len(mido.MidiFile(tmp_path / f).tracks) == 4 for f in files)  # conductor, drums, bass, keys
    corpus = load_corpus(tmp_path, min_bars=4, window_steps=64)
    assert corpus.split_by == "section" and not corpus.skipped
    assert corpus.skipped_bars == {"time signature 3/4": 8}
    assert [corpus.bars(s) for s in SPLITS] == [272, 32, 32]
