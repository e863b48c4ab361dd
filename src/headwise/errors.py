"""The one error type of headwise.

Every bad input raises :class:`HeadwiseError` with a message that names the argument,
what was expected and what was given, so that a user can fix the call without reading
the source.
"""

from __future__ import annotations

from typing import Any


class HeadwiseError(ValueError):
    """Raised for any invalid input to headwise (a subclass of ``ValueError``)."""


def bad_argument(name: str, expected: str, actual: Any) -> HeadwiseError:
    """Build the canonical error: ``<name>: expected <expected>, got <actual>``."""
    return HeadwiseError(f"{name}: expected {expected}, got {actual}")
