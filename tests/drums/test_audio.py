"""WAV previews: the synthesised kit plays the events at the sample's tempo, as a standard WAV file."""

import shutil
import wave

import numpy as np
import pytest

from solver.drums.audio import (
    RING_SECONDS,
    SAMPLE_RATE,
    drum_kit,
    find_soundfont,
    read_wav,
    render_drums,
    write_preview,
    write_wav,
)
from solver.drums.encoding import DRUM_NAMES, NUM_CLASSES, pitches_to_event
from solver.drums.midi import write_drum_midi

KICK, SNARE, HAT = pitches_to_event([36]), pitches_to_event([38]), pitches_to_event([42])


def onsets(audio, threshold=0.05):
    """Sample indices where the signal first rises above `threshold` after a quiet stretch."""
    loud = np.abs(audio) > threshold
    starts, last = [], -SAMPLE_RATE
    for index in np.flatnonzero(loud):
        if index - last > SAMPLE_RATE // 20:  # 50 ms of quiet separates two hits
            starts.append(int(index))
        last = index
    return starts


def test_the_kit_has_a_distinct_audible_sound_for_every_drum_class():
    kit = drum_kit()
    assert len(kit) == NUM_CLASSES == len(DRUM_NAMES)
    for sound in kit:
        assert sound.dtype == np.float32 and 0.1 < np.abs(sound).max() <= 1.0
    spectra = [np.abs(np.fft.rfft(sound[:2048], 2048)) for sound in kit]
    centroids = [float((s * np.arange(len(s))).sum() / s.sum()) for s in spectra]
    kick, snare, closed_hat = centroids[0], centroids[1], centroids[2]
    assert kick < snare < closed_hat  # low thump, mid crack, high tick


@pytest.mark.parametrize("qpm", [60.0, 120.0, 150.0])
def test_hits_sound_on_their_steps_at_the_samples_tempo(qpm):
    events = np.zeros(32, dtype=np.int64)
    events[[0, 8, 16]] = KICK  # every half note
    audio = render_drums(events, qpm)
    step = 60.0 / qpm / 4 * SAMPLE_RATE
    assert onsets(audio) == pytest.approx([0, 8 * step, 16 * step], abs=SAMPLE_RATE * 0.003)
    assert len(audio) >= 32 * step  # the whole pattern, plus the ring of the last hit


def test_preview_seconds_cut_the_pattern_and_silence_is_silent():
    events = np.full(64, HAT, dtype=np.int64)
    long, short = render_drums(events, 120.0), render_drums(events, 120.0, seconds=2.0)
    assert len(short) < len(long)
    assert len(onsets(short, threshold=0.02)) <= 16 + 1  # 2 s at 120 qpm = 16 sixteenths
    assert not render_drums(np.zeros(16, dtype=np.int64), 120.0).any()


def test_loud_patterns_are_scaled_not_clipped():
    events = np.full(16, (1 << NUM_CLASSES) - 1, dtype=np.int64)  # every drum on every step
    audio = render_drums(events, 200.0)
    assert np.abs(audio).max() == pytest.approx(0.9, abs=1e-3)


def test_wav_file_is_16_bit_mono_pcm_of_the_rendered_length(tmp_path):
    events = np.array([KICK, 0, HAT, 0, SNARE, 0, HAT, 0] * 2, dtype=np.int64)
    audio = render_drums(events, 100.0)
    write_wav(audio, tmp_path / "a.wav")
    with wave.open(str(tmp_path / "a.wav")) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, SAMPLE_RATE)
        assert wav.getnframes() == len(audio)
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    np.testing.assert_allclose(frames / 32767, audio, atol=1 / 32767 + 1e-6)


def test_preview_uses_the_synthesised_kit_without_a_sound_font(tmp_path, monkeypatch):
    monkeypatch.setenv("SOLVER_SOUNDFONT", str(tmp_path / "absent.sf2"))
    events = np.array([KICK, 0, 0, 0, SNARE, 0, 0, 0] * 4, dtype=np.int64)
    write_drum_midi(events, tmp_path / "s.mid", qpm=90)
    assert write_preview(events, tmp_path / "s.wav", qpm=90, seconds=4.0) == "synth"
    with wave.open(str(tmp_path / "s.wav")) as wav:
        assert 2.0 < wav.getnframes() / SAMPLE_RATE < 4.0 + 2.0  # 32 steps at 90 qpm: 5.3 s, cut at 4 s


@pytest.mark.skipif(not (shutil.which("fluidsynth") and find_soundfont()), reason="no fluidsynth or GM sound font")
def test_preview_uses_fluidsynth_when_present(tmp_path):
    events = np.array([KICK, 0, 0, 0, SNARE, 0, 0, 0] * 4, dtype=np.int64)
    write_drum_midi(events, tmp_path / "s.mid", qpm=90)
    assert write_preview(events, tmp_path / "s.wav", qpm=90) == "fluidsynth"
    with wave.open(str(tmp_path / "s.wav")) as wav:
        assert wav.getnframes() > 0


@pytest.mark.skipif(not (shutil.which("fluidsynth") and find_soundfont()), reason="no fluidsynth or GM sound font")
@pytest.mark.parametrize("seconds", [2.0, None])
def test_fluidsynth_previews_are_cut_at_preview_seconds_and_mono(tmp_path, seconds):
    events = np.array([KICK, 0, HAT, 0, SNARE, 0, HAT, 0] * 8, dtype=np.int64)  # 64 steps: 8 s at 120 qpm
    assert write_preview(events, tmp_path / "s.wav", qpm=120, seconds=seconds) == "fluidsynth"
    audio, rate = read_wav(tmp_path / "s.wav")
    played = 8.0 if seconds is None else seconds
    assert rate == SAMPLE_RATE and played <= len(audio) / rate <= played + RING_SECONDS
    with wave.open(str(tmp_path / "s.wav")) as wav:
        assert wav.getnchannels() == 1
    assert np.abs(audio[: int(0.1 * rate)]).max() > 0.01  # the first kick sounds


def test_read_wav_averages_channels_to_mono_floats(tmp_path):
    with wave.open(str(tmp_path / "st.wav"), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(np.array([16384, 0, -16384, -16384], dtype="<i2").tobytes())
    audio, rate = read_wav(tmp_path / "st.wav")
    assert rate == 8000 and audio.tolist() == [0.25, -0.5]
