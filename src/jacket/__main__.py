"""`python -m jacket`: the command line."""

from .cli import main

main()
