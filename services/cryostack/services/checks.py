"""Parameter checks every stage writes the same way: a list of ``(field, ok, reason)`` raised at the first failure
as :class:`cryostack.errors.InvalidArgumentError` naming the field."""

from __future__ import annotations

import math

from cryostack.errors import InvalidArgumentError

Check = tuple[str, bool, str]


def finite_positive(value: float) -> bool:
    """True for a finite number above zero."""
    return math.isfinite(value) and value > 0


def nyquist_check(field: str, resolution_a: float, pixel_size_a: float | None) -> list[Check]:
    """The check that a resolution is not finer than the Nyquist limit of a pixel size (none without one)."""
    if pixel_size_a is None:
        return []
    nyquist_a = 2.0 * pixel_size_a
    return [(field, resolution_a >= nyquist_a * (1 - 1e-9),
             f"{resolution_a:g} Å is finer than the Nyquist limit {nyquist_a:g} Å (pixel size {pixel_size_a:g} Å)")]


def raise_first(checks: list[Check]) -> None:
    """Raise :class:`InvalidArgumentError` for the first failed check."""
    for field, ok, reason in checks:
        if not ok:
            raise InvalidArgumentError(field, reason)
