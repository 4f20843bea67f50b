"""`python -m crystalscope.cli`."""

from crystalscope.cli import main

main()
