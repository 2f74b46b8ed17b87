"""Errors that the command-line entry points turn into one clear line (no traceback wall)."""


class HDLError(Exception):
    """Base class of the errors a user can fix: bad configuration or bad data."""


class ConfigError(HDLError):
    """A configuration value is wrong; the message names the key."""


class DataError(HDLError):
    """The data is missing or unusable; the message names the file or data set."""
