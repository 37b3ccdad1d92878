"""``python -m lazymoe``: the command line (see ``cli``)."""

from .cli import run

run()
