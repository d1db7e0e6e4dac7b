"""Errors caused by user input: the entry points print them as one line and exit non-zero."""

USER_ERROR_EXIT = 2  # the exit status of a run, or a sweep, ended by a user error


class LmlabError(Exception):
    """A problem the user can fix; its message says what is wrong and how to fix it."""


class ConfigError(LmlabError):
    """An invalid configuration value."""


class DataError(LmlabError):
    """A corpus that cannot be used as given."""


class RunStopped(LmlabError):
    """A run that stopped before its last step; its last good checkpoint is kept for a resume.

    `status` is what the run's metrics.json records, so sweep reports can tell why it stopped.
    """

    status = "failed"


class DivergedError(RunStopped):
    """The training loss (or the weights) became NaN or infinite."""


class RunInterrupted(RunStopped):
    """Ctrl-C or SIGTERM: a resumable checkpoint was written before stopping."""

    status = "interrupted"


class DiskFull(RunStopped):
    """No space left on the device (or the quota is spent): the file being written was not replaced."""
