"""Run checkpoints.lightning_run() as a separate process, for tests that watch a live training run.

Usage: python tests/lightning_train.py --dir RUN_DIR [--epochs 3] [--save-top-k -1] [--epoch-sleep 0.5]
Prints each .ckpt path present at the end, one a line, and exits 0.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints import lightning_run


def main(argv: list[str] | None = None) -> int:
    """Parse argv, train into --dir, print the checkpoint paths written; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="ModelCheckpoint dirpath")
    parser.add_argument("--epochs", type=int, default=3, help="max_epochs")
    parser.add_argument("--save-top-k", type=int, default=-1, help="ModelCheckpoint save_top_k")
    parser.add_argument("--epoch-sleep", type=float, default=0.0, help="seconds to sleep between epochs")
    args = parser.parse_args(argv)
    for path in lightning_run(
        args.dir, max_epochs=args.epochs, save_top_k=args.save_top_k, epoch_sleep=args.epoch_sleep
    ):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
