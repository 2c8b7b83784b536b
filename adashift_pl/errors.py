"""The one exception type for mistakes the user can fix (bad flag, missing file).

`python -m adashift_pl.train` turns it into exit code 2 and a single line on
stderr, no traceback. Its message must name the bad value and what is allowed.
"""


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong and what is allowed."""
