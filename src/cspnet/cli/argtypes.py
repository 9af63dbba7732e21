"""argparse ``type=`` checkers shared by the sub-commands: a bad value is refused while the command line
is parsed, with the option named ("argument --batch-size: expected a positive integer, got '0'"), rather
than treated as "off" or failing deep inside a run."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], requirement: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text and require ``ok(value)``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}")
        return value
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, "a positive integer")
NON_NEGATIVE_INT = checked(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = checked(float, lambda v: 0 < v < math.inf, "a positive number")
NON_NEGATIVE = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")  # NaN fails every comparison
PROBABILITY = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
FRACTION = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
# BatchNorm in training mode needs two values per channel: a batch of one cannot be analysed
BATCH_STATISTICS = checked(int, lambda v: v >= 2, "an integer >= 2 (BatchNorm statistics need two images)")
EMA_DECAY = checked(float, lambda v: 0 <= v < 1, "a decay in [0, 1) (0 = off)")
