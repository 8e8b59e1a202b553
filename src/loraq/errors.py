"""The one exception type loraq raises for anything a user can fix."""


class LoraqError(ValueError):
    """Bad input, a bad option, or a missing or corrupt file.

    The message names the option, file, line or tensor at fault; the CLI prints it as one line.
    """
