"""Field checks shared by every config; free of torch and SAELens, so that the
command line can validate its arguments before importing either."""

from __future__ import annotations

from typing import Any


class FieldValueError(ValueError):
    """A config field holds a value outside its allowed set (``name``, ``value``)."""

    def __init__(self, message: str, name: str, value: Any) -> None:
        super().__init__(message)
        self.name = name
        self.value = value


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise FieldValueError(
            f"{name} must be one of {allowed}, got {value!r}", name, value
        )


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise a ValueError naming ``name``, ``value`` and the allowed range."""
    if value is None:  # not a number at all
        too_low, too_high = True, False
    else:
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (
            value > high if high_inclusive else value >= high
        )
    if too_low or too_high or value != value:  # value != value catches NaN
        left = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low}"
        right = "inf)" if high is None else f"{high}" + ("]" if high_inclusive else ")")
        raise FieldValueError(
            f"{name} must be in {left}, {right}, got {value!r}", name, value
        )
