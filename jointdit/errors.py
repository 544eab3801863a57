"""The one exception type for mistakes a user can fix (bad input, missing files, bad knobs)."""


class UserError(Exception):
    """A problem with the user's input. Scripts print it as one line and exit with code 2.

    The message must name the file, key or value at fault and, where it helps, what is accepted
    or which command fixes it.
    """
