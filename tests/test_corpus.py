"""The bundled drum corpus: present, well formed, and reproducible from its generator script."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import mido

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "drums"
SCRIPT = ROOT / "scripts" / "make_drum_corpus.py"
DRUM_CHANNEL = 9  # channel 10, counted from zero


def load_generator() -> ModuleType:
    """Import ``scripts/make_drum_corpus.py``, which is a script and not part of the package."""
    spec = importlib.util.spec_from_file_location("make_drum_corpus", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def corpus_files() -> list[Path]:
    """Every MIDI file of the committed corpus, in a stable order."""
    return sorted(CORPUS.rglob("*.mid"))


def test_corpus_holds_several_styles_and_a_readme():
    files = corpus_files()
    assert len(files) >= 100
    assert len({path.parent.name for path in files}) >= 5
    assert (CORPUS / "README.md").is_file()


def test_every_file_is_4_4_with_a_tempo_and_drum_notes_on_channel_10():
    for path in corpus_files():
        messages = [msg for track in mido.MidiFile(path).tracks for msg in track]
        signatures = [(m.numerator, m.denominator) for m in messages if m.type == "time_signature"]
        channels = {m.channel for m in messages if m.type == "note_on" and m.velocity > 0}
        assert signatures == [(4, 4)], path
        assert any(m.type == "set_tempo" for m in messages), path
        assert channels == {DRUM_CHANNEL}, path


def test_regenerating_with_the_default_seed_gives_the_committed_bytes(tmp_path: Path):
    generator = load_generator()
    for index in (0, 1, 17):
        piece = generator.generate(index, generator.DEFAULT_SEED)
        written = generator.write_piece(piece, tmp_path)
        assert written.read_bytes() == (CORPUS / piece.path).read_bytes(), piece.path
