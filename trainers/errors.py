"""The error a user can fix: the CLI shows its message and exits with code 2."""


class ConfigError(Exception):
    """A bad value in the composed config, the command line or the run directory.

    The message names the key, the value and the fix; the CLI prints it without
    a traceback and exits with code 2.
    """


class LauncherError(ConfigError):
    """Launcher variables (RANK, SLURM_*) that contradict each other: every
    process prints it, since rank 0 may be the one that is wrong or missing."""


class Stopped(Exception):
    """A signal (SIGINT, SIGTERM, SIGUSR1) stopped training at a step boundary,
    after every rank agreed and the last checkpoint was written."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
