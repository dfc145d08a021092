"""The one exception type for problems the user can fix (bad files, flags, values)."""


class CryocapsError(Exception):
    """A user error: printed as one red line by the CLI, exit code 2.

    The message names the file, flag or value at fault and, where it can,
    what to do about it.
    """
