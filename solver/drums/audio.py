"""WAV previews of drum events: a small drum kit synthesised with numpy, or fluidsynth when present.

A generated pattern should be heard, not only seen as a piano roll. The kit is made in code
(a pitch-swept sine kick, a tone-and-noise snare, filtered-noise hats and cymbals, swept-sine
toms), so nothing is downloaded. When the `fluidsynth` program and a General MIDI sound font
are on the machine (`$SOLVER_SOUNDFONT`, or a usual system path), it renders the same steps
(written as MIDI) instead. Either way a preview is 16-bit mono PCM, cut at `preview_seconds`.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from .encoding import NUM_CLASSES, STEPS_PER_QUARTER, check_events, events_to_hits
from .midi import write_drum_midi

SAMPLE_RATE = 22050
RING_SECONDS = 1.5  # how long the last hit of a preview may ring (the kit's longest sound: 1.4 s)
SOUNDFONT_ENV = "SOLVER_SOUNDFONT"
SOUNDFONT_PATHS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
)


def _envelope(seconds: float, decay: float, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return t, np.exp(-t / decay)


def _sweep(start_hz: float, end_hz: float, seconds: float, decay: float, sample_rate: int) -> np.ndarray:
    """A sine falling exponentially from `start_hz` to `end_hz`: kicks and toms."""
    t, env = _envelope(seconds, decay, sample_rate)
    freq = end_hz + (start_hz - end_hz) * np.exp(-t / 0.03)
    return np.sin(2 * np.pi * np.cumsum(freq) / sample_rate) * env


def _noise(seconds: float, decay: float, sample_rate: int, rng: np.random.Generator,
           brightness: int = 1) -> np.ndarray:
    """White noise, high-passed `brightness` times by a first difference: hats, snares, cymbals."""
    t, env = _envelope(seconds, decay, sample_rate)
    noise = rng.standard_normal(len(t))
    for _ in range(brightness):
        noise = np.diff(noise, prepend=0.0) / 2
    return noise / max(np.abs(noise).max(), 1e-9) * env


@functools.lru_cache(maxsize=4)
def drum_kit(sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, ...]:
    """One float waveform per drum class, in encoding order (kick, snare, ..., ride)."""
    rng = np.random.default_rng(0)  # the same kit every time
    sr = sample_rate
    t_ride, env_ride = _envelope(0.9, 0.45, sr)
    bell = sum(np.sin(2 * np.pi * f * t_ride) for f in (523.0, 797.0, 1187.0, 1601.0)) / 4
    kit = (
        _sweep(150.0, 48.0, 0.4, 0.13, sr),  # kick
        0.45 * _sweep(220.0, 180.0, 0.25, 0.05, sr) + 0.7 * _noise(0.25, 0.06, sr, rng),  # snare
        0.5 * _noise(0.07, 0.015, sr, rng, brightness=2),  # closed hi-hat
        0.5 * _noise(0.45, 0.16, sr, rng, brightness=2),  # open hi-hat
        0.8 * _sweep(130.0, 85.0, 0.45, 0.18, sr),  # low tom
        0.8 * _sweep(180.0, 125.0, 0.4, 0.16, sr),  # mid tom
        0.8 * _sweep(250.0, 170.0, 0.35, 0.14, sr),  # high tom
        0.55 * _noise(1.4, 0.5, sr, rng, brightness=2),  # crash
        0.3 * bell * env_ride + 0.15 * _noise(0.9, 0.3, sr, rng, brightness=2),  # ride
    )
    assert len(kit) == NUM_CLASSES
    return tuple(k.astype(np.float32) for k in kit)


def render_drums(events: np.ndarray, qpm: float, seconds: float | None = None,
                 sample_rate: int = SAMPLE_RATE, steps_per_quarter: int = STEPS_PER_QUARTER) -> np.ndarray:
    """Mono float32 audio in [-1, 1] of the events played at `qpm` on the synthesised kit.

    Only the steps that start within `seconds` (all if None) are played; the last hits ring out.
    """
    if not qpm > 0:
        raise ValueError(f"qpm must be positive, got {qpm}")
    hits = events_to_hits(events)
    step_seconds = 60.0 / qpm / steps_per_quarter
    if seconds is not None:
        hits = hits[: max(1, int(seconds / step_seconds))]
    kit = drum_kit(sample_rate)
    ring = max(len(sound) for sound in kit)
    audio = np.zeros(int(len(hits) * step_seconds * sample_rate) + ring, dtype=np.float32)
    for step, drum in zip(*np.nonzero(hits)):
        start = int(round(step * step_seconds * sample_rate))
        audio[start:start + len(kit[drum])] += kit[drum]
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    return audio * (0.9 / peak) if peak > 0.9 else audio


def write_wav(audio: np.ndarray, path: str | Path, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio in [-1, 1] as a 16-bit PCM WAV file."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


def find_soundfont() -> Path | None:
    """A General MIDI sound font for fluidsynth: $SOLVER_SOUNDFONT, else a usual system path."""
    candidates = [os.environ[SOUNDFONT_ENV]] if os.environ.get(SOUNDFONT_ENV) else list(SOUNDFONT_PATHS)
    return next((Path(c) for c in candidates if Path(c).is_file()), None)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 audio in [-1, 1] (channels averaged) and the sample rate of a 16-bit PCM WAV file."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * wav.getsampwidth()}-bit samples; only 16-bit PCM is read")
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, wav.getnchannels())
        return (frames.astype(np.float32) / 32768).mean(axis=1), wav.getframerate()


def _played_steps(events: np.ndarray, qpm: float, seconds: float | None) -> np.ndarray:
    """The steps that start within `seconds` (all if None), as `render_drums` plays them."""
    step_seconds = 60.0 / qpm / STEPS_PER_QUARTER
    return events if seconds is None else events[: max(1, int(seconds / step_seconds))]


def render_fluidsynth(events: np.ndarray, qpm: float, seconds: float | None, soundfont: Path,
                      program: str) -> np.ndarray | None:
    """Mono audio of the first `seconds` of the events by fluidsynth, or None if it fails.

    The played steps are written to a MIDI file of their own (fluidsynth plays a whole file), and
    the render is cut `RING_SECONDS` after the last step starts, with a short fade: fluidsynth
    renders its reverb tail to silence, seconds past the pattern.
    """
    played = _played_steps(check_events(events), qpm, seconds)
    with tempfile.TemporaryDirectory(prefix="solver-preview-") as tmp:
        midi_path, wav_path = Path(tmp) / "preview.mid", Path(tmp) / "preview.wav"
        write_drum_midi(played, midi_path, qpm=qpm)
        command = [program, "-ni", "-g", "1.0", "-r", str(SAMPLE_RATE), "-F", str(wav_path), str(soundfont),
                   str(midi_path)]
        done = subprocess.run(command, capture_output=True, timeout=120, check=False)
        if done.returncode != 0 or not wav_path.exists():
            return None
        audio, rate = read_wav(wav_path)
    if rate != SAMPLE_RATE:
        return None
    end = int((len(played) * 60.0 / qpm / STEPS_PER_QUARTER + RING_SECONDS) * SAMPLE_RATE)
    audio = audio[:end].copy()
    fade = min(len(audio), SAMPLE_RATE // 20)
    audio[len(audio) - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return audio


def write_preview(events: np.ndarray, wav_path: str | Path, qpm: float, seconds: float | None = None) -> str:
    """Write a WAV preview (16-bit mono) of the first `seconds` of a drum sample (all if None);
    returns the renderer used: 'fluidsynth' when it and a sound font are found and succeed,
    else 'synth', the synthesised kit."""
    soundfont, program = find_soundfont(), shutil.which("fluidsynth")
    if soundfont is not None and program is not None:
        audio = render_fluidsynth(events, qpm, seconds, soundfont, program)
        if audio is not None:
            write_wav(audio, wav_path)
            return "fluidsynth"
    write_wav(render_drums(events, qpm, seconds), wav_path)
    return "synth"
