"""Export the best state of an experiment as a standalone checkpoint (e.g. a pretrained model).

    python scripts/export_checkpoint.py outputs/xps/<sig> pretrained/drums_small.th
    dora run solver=drum_rnn continue_from=//pretrained/drums_small
"""

from __future__ import annotations

import argparse
import sys

from solver.checkpointing.format import CheckpointError, export_best_state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', help='checkpoint file or experiment folder')
    parser.add_argument('target', help='file to write, e.g. pretrained/<name>.th')
    args = parser.parse_args()
    try:
        ckpt = export_best_state(args.source, args.target)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {ckpt.path} (best state of {ckpt.meta.get('exported_from')}, "
          f"epoch {ckpt.meta.get('epoch')}, sig {ckpt.meta.get('sig')})")
    return 0


if __name__ == '__main__':
    sys.exit(main())
