"""Errors caused by user input: the entry points print them as one line and exit non-zero."""


class LmlabError(Exception):
    """A problem the user can fix; its message says what is wrong and how to fix it."""


class ConfigError(LmlabError):
    """An invalid configuration value."""


class DataError(LmlabError):
    """A corpus that cannot be used as given."""
