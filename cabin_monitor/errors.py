"""The daemon's errors: one base class, and the process exit code that each kind stands for.

``cli.main`` turns any ``CabinMonitorError`` into one line on stderr and its ``exit_code``; the
modules raise the subclass that says what went wrong.
"""

from __future__ import annotations

from typing import ClassVar


class CabinMonitorError(Exception):
    """Base of every error the daemon reports to its operator in one line."""

    exit_code: ClassVar[int] = 1


class ConfigurationError(CabinMonitorError):
    """The configuration file or the command line cannot be used; fix it and start again."""

    exit_code = 2


class RuntimeFault(CabinMonitorError):
    """Something the daemon needs is missing or broken: a model, the camera or video, the outbox, a certificate."""

    exit_code = 1


class ModelError(RuntimeFault):
    """A model (emotion or face detector) cannot be found or loaded, or does not fit what the daemon needs."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model file is not where it was looked for (still a ``FileNotFoundError`` for code that catches those).

    A setup error: restarting cannot bring the file, so it exits like a configuration error.
    """

    exit_code = ConfigurationError.exit_code
