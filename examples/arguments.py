"""Command-line value types shared by the examples: a bad value becomes an argparse error that names the option and
what it allows, not a traceback from deep inside the run."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """A `type=` for values of `kind` that must be >= `minimum`."""

    def parse(text: str) -> float:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    # argparse names the type in its "invalid <name> value" message.
    parse.__name__ = kind.__name__
    return parse


def positive(text: str) -> float:
    """A `type=` for floats that must be > 0 (learning rates, epochs)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
