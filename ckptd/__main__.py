"""`python -m ckptd`."""

from ckptd.cli import main

main()
