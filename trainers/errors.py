"""The error a user can fix: the CLI shows its message and exits with code 2."""


class ConfigError(Exception):
    """A bad value in the composed config, the command line or the run directory.

    The message names the key, the value and the fix; the CLI prints it without
    a traceback and exits with code 2.
    """
