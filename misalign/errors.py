"""The one exception type for bad input.

Raise `InputError("path/to/file: what is wrong")` anywhere; the CLI prints its message as a single
line on stderr and exits with code 2. The message must name the file (or option) and the problem.
"""


class InputError(Exception):
    """Bad input from the user: a missing file, a malformed dataset, an option out of range."""
