"""Magenta's Drums RNN (drum_kit) on the StandardSolver: encoding, MIDI data, model, solver."""

from .solver import DrumRNNSolver

__all__ = ['DrumRNNSolver']
