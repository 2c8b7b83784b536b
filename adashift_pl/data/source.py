"""One place that decides between a real data set and its synthetic stand-in.

`--data.source auto|real|synthetic` (DESIGN.md): `auto` uses the real data set when
it is on disk (or `--data.download true` will fetch it), else the built-in
synthetic stand-in -- and says so loudly, because a number measured on synthetic
data must never be mistaken for a paper number.
"""

from __future__ import annotations

import sys

from adashift_pl.errors import UserError

SOURCES = ("auto", "real", "synthetic")


def resolve_source(source: str, *, available: bool, dataset: str, expected: str,
                   download: bool = False) -> str:
    """Return "real" or "synthetic" for a data module.

    available: the real files are on disk; expected: the path they were looked for
    at (named in errors); download: the user asked to fetch the real data set.
    """
    if source not in SOURCES:
        raise UserError(f"invalid data.source {source!r} for {dataset}: allowed are {', '.join(SOURCES)}")
    if source == "synthetic":
        return "synthetic"
    if available or download:
        return "real"
    if source == "real":
        raise UserError(
            f"{dataset} not found at {expected}: put the data set there, "
            f"or add --data.download true to fetch it, or use --data.source synthetic"
        )
    warn_synthetic(dataset, expected)
    return "synthetic"


def warn_synthetic(dataset: str, expected: str) -> None:
    """The loud notice printed when `auto` falls back to the synthetic stand-in."""
    bar = "!" * 78
    print(
        f"{bar}\n"
        f"!! {dataset}: real data not found at {expected}\n"
        f"!! USING THE BUILT-IN SYNTHETIC STAND-IN -- results are NOT comparable to the paper.\n"
        f"!! Fetch the real data with --data.download true, or silence this with --data.source synthetic.\n"
        f"{bar}",
        file=sys.stderr,
        flush=True,
    )
