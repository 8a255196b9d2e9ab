"""Shared assertions for configuration errors."""

from __future__ import annotations

from pathlib import Path

from uplinkd.errors import ConfigError


def config_error(error: ConfigError, path: Path, line: int, key: str, *fragments: str) -> None:
    """The error names the file, line and key first, then says what was wrong."""
    message = str(error)
    assert (error.line, error.key) == (line, key), message
    assert message.startswith(f"{path}:{line}: {key + ': ' if key else ''}"), message
    for fragment in fragments:
        assert fragment in message
