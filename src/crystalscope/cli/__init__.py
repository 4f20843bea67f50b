"""The `crystalscope` command line: one module per command group; each command parses its
options, calls one stage function and prints. Rules live in the stages, not here."""

from crystalscope.cli import data, demo, explore, label, monitor, predict, synth, train  # noqa: F401
from crystalscope.cli.app import app, main

__all__ = ["app", "main"]
