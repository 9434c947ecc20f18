"""The random number generators of a process, as a state source (for exact resume).

NumPy's state is stored as a tensor so that checkpoints stay loadable with `weights_only=True`.
"""

from __future__ import annotations

import random
import typing as tp

import numpy as np
import torch


class RNGState:
    """`state_dict()` captures Python's, NumPy's and torch's global generators; load restores them."""

    def state_dict(self) -> dict[str, tp.Any]:
        kind, keys, pos, has_gauss, cached = tp.cast(tuple, np.random.get_state(legacy=True))
        state: dict[str, tp.Any] = {
            'python': random.getstate(),
            'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                      'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
            'torch': torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, tp.Any]) -> None:
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))
        np_state = state['numpy']
        np.random.set_state((np_state['kind'], np_state['keys'].numpy().astype(np.uint32),
                             np_state['pos'], np_state['has_gauss'], np_state['cached_gaussian']))
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])
