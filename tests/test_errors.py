"""Tests of the error classes: one base, and the exit code each kind of error stands for."""

from __future__ import annotations

import pytest

from cabin_monitor.bus.mqtt import TlsSetupError
from cabin_monitor.bus.outbox import OutboxContentError, OutboxError
from cabin_monitor.config import ConfigError
from cabin_monitor.errors import CabinMonitorError, ConfigurationError, ModelError, ModelNotFoundError, RuntimeFault
from cabin_monitor.rules import ClassMismatchError
from cabin_monitor.vision.capture import SourceError, SourceSetupError
from cabin_monitor.vision.emotion import ProviderError


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [
        (ConfigError, 2),
        (ConfigurationError, 2),
        (ModelError, 1),
        (ModelNotFoundError, 2),
        (ProviderError, 1),
        (SourceError, 1),
        (SourceSetupError, 2),
        (OutboxError, 1),
        (OutboxContentError, 1),
        (TlsSetupError, 2),
        (ClassMismatchError, 1),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_every_error_has_the_base_class_and_its_exit_code(error: type[CabinMonitorError], exit_code: int) -> None:
    """Configuration and setup problems a restart cannot fix exit 2; runtime faults exit 1."""
    assert issubclass(error, CabinMonitorError)
    assert error.exit_code == exit_code
    assert issubclass(error, ConfigurationError) or (issubclass(error, RuntimeFault) and exit_code in (1, 2))
    if exit_code == 1:
        assert not issubclass(error, ConfigurationError)


def test_errors_keep_the_standard_bases_their_callers_catch() -> None:
    """A missing model is still a FileNotFoundError, and rules that do not fit the model still a ValueError."""
    assert issubclass(ModelNotFoundError, FileNotFoundError)
    assert issubclass(ClassMismatchError, ValueError)
