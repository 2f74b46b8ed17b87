"""Errors that the command-line entry points turn into one clear line (no traceback wall), and
the exit codes of ``hdl-train`` (docs/runs.md)."""

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected error (a bug): the traceback is printed and kept in error.txt
EXIT_CONFIG = 2  # a configuration or data error, or a run identity mismatch: one line
EXIT_NON_FINITE = 3  # the loss or a metric became NaN / inf: the run was stopped
EXIT_SWEEP_FAILED = 4  # a sweep ran all its jobs, and some of them failed
EXIT_SIGTERM = 143  # stopped by SIGTERM (preemption): relaunch with the same run_id resumes


class HDLError(Exception):
    """Base class of the errors a user can fix: bad configuration or bad data."""

    exit_code = EXIT_CONFIG


class ConfigError(HDLError):
    """A configuration value is wrong; the message names the key."""


class DataError(HDLError):
    """The data is missing or unusable; the message names the file or data set."""


class NonFiniteError(HDLError):
    """The training loss or a metric is NaN or infinite: the run stops, nothing is reported as a
    result (exit code 3)."""

    exit_code = EXIT_NON_FINITE
