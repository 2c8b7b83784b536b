"""The one exception type for mistakes the user can fix (bad flag, missing file).

`python -m adashift_pl.train` turns it into exit code 2 and a single line on
stderr, no traceback. Its message must name the bad value and what is allowed.
"""

from __future__ import annotations

from typing import Any

# A message quoting a value the user gave stays readable however large the value was.
MAX_MESSAGE_CHARS = 2000


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong and what is allowed."""


def one_line(text: Any) -> str:
    """`text` with its whitespace runs (newlines too) made single spaces, clipped to MAX_MESSAGE_CHARS."""
    line = " ".join(str(text).split())
    if len(line) > MAX_MESSAGE_CHARS:
        line = f"{line[:MAX_MESSAGE_CHARS]} ... ({len(line) - MAX_MESSAGE_CHARS:,} more characters)"
    return line
