"""Wording shared by the messages users read (CLI lines, JSON reasons, warnings)."""

from __future__ import annotations


def quantity(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` as a person writes them: "1 red cell", "3 red cells", "0 images".

    Why: counts in reasons and warnings are mostly 1 or a handful ("1 round object"), and a
    hematologist reads them as sentences."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
