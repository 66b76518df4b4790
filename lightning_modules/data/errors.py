"""The exception raised for every data problem that a user can fix."""


class DataError(ValueError):
    """Invalid or missing data, or an invalid data option.

    The message names the bad value (a path, a file, an option) and gives the fix.
    """
