"""`python -m aligndistil_cli` is the `aligndistil` console script."""

from aligndistil_cli.cli import main

main()
