"""Number types for the command lines of the daemon, its children and its tools.

Each is an ``argparse`` ``type=`` callable: it returns the value or raises
``argparse.ArgumentTypeError`` with a message naming what was expected.
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer ≥ 1, in any base ``int(text, 0)`` takes (``0x1000`` too)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text}")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"timeout must be a positive number, not {text}")
    return value
