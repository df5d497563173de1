"""ckptd: verifies, catalogs, prunes and mirrors training checkpoints."""

__version__ = "0.1.0"
