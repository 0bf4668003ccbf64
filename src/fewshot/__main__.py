"""`python -m fewshot` runs the command line."""

from fewshot.cli import run

run()
