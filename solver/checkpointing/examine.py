"""Verify a checkpoint and print what it holds: `python -m solver.checkpointing.examine FILE_OR_XP_FOLDER`."""

from __future__ import annotations

import argparse
import sys
import typing as tp

import torch

from .faults import CheckpointError
from .recovery import load_source


def describe(obj: tp.Any, indent: str = '', depth: int = 3) -> list[str]:
    """Indented lines naming each entry, tensors as dtype and shape."""
    if isinstance(obj, torch.Tensor):
        return [f"{indent}{str(obj.dtype).replace('torch.', '')}{list(obj.shape)}"]
    if isinstance(obj, dict) and depth > 0:
        lines = []
        for key, value in obj.items():
            inner = describe(value, indent + '  ', depth - 1)
            if len(inner) == 1:
                lines.append(f"{indent}{key}: {inner[0].strip()}")
            else:
                lines += [f"{indent}{key}:"] + inner
        return lines
    if isinstance(obj, (dict, list, tuple)):
        return [f"{indent}{type(obj).__name__} of {len(obj)}"]
    return [f"{indent}{obj!r:.80}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('path')
    parser.add_argument('--depth', type=int, default=3)
    args = parser.parse_args(argv)
    try:
        ckpt = load_source(args.path)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    meta = {k: v for k, v in ckpt.meta.items() if k != 'config'}
    print(f"{ckpt.path}: intact (digests verified)")
    print('\n'.join(describe({'meta': meta, 'state': ckpt.state}, depth=args.depth)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
