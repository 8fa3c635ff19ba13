"""`python -m aligndistil_cli` is the `aligndistil` console script."""

from .cli import main

main()
