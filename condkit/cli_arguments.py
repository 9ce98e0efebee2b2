"""What the command line accepts: a parser whose errors are one line, and value types checked at the edge.

Every type raises argparse.ArgumentTypeError with what was expected, so a bad value gives one line,
`condkit: error: argument --seed: invalid value '-1': expected an integer in [0, 2**64)`, exit
status 2, before anything loads.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, NoReturn

SEED_LIMIT = 2**64


class CommandLineError(ValueError):
    """A bad argument; the CLI prints it as one `condkit: error:` line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse with no abbreviations (a `--data` never silently means `--dataset-size`) and one-line errors
    instead of a usage block."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(f"{message} (see {self.prog} --help)")


def _checked(kind: str, parse: Callable[[str], object], accept: Callable[[object], bool]) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            value = parse(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {kind}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {kind}")
        return value

    convert.__name__ = kind  # argparse names the type in some messages
    return convert


seed = _checked("an integer in [0, 2**64)", int, lambda value: 0 <= value < SEED_LIMIT)
positive_int = _checked("a positive integer", int, lambda value: value >= 1)
non_negative_int = _checked("a non-negative integer", int, lambda value: value >= 0)
multiple_of_8 = _checked("a positive multiple of 8", int, lambda value: value >= 8 and value % 8 == 0)
finite_float = _checked("a finite number", float, math.isfinite)
non_negative_float = _checked("a finite number >= 0", float, lambda value: math.isfinite(value) and value >= 0)
positive_float = _checked("a finite number > 0", float, lambda value: math.isfinite(value) and value > 0)
strength = _checked("a number in (0, 1]", float, lambda value: 0 < value <= 1)  # NaN compares False


def timestep(num_train_timesteps: int = 1000) -> Callable[[str], object]:
    return _checked(f"an integer in [0, {num_train_timesteps})", int, lambda value: 0 <= value < num_train_timesteps)
