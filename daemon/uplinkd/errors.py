"""Typed errors; the command line (and later the D-Bus adapter) maps them to messages."""

from __future__ import annotations

from pathlib import Path


class UplinkdError(Exception):
    """Base of every error uplinkd reports to a person instead of a traceback."""


class ConfigError(UplinkdError):
    """A configuration that cannot be used; names the file, line and key."""

    def __init__(self, path: Path | str, message: str, *, line: int = 0, key: str = "") -> None:
        self.path = Path(path)
        self.line = line
        self.key = key
        self.message = message
        where = str(path) + (f":{line}" if line else "")
        what = f"{key}: " if key else ""
        super().__init__(f"{where}: {what}{message}")


class DiscoveryError(UplinkdError):
    """The host's interfaces cannot carry the configuration (no usable link at all)."""


class HookError(UplinkdError):
    """A hook file that cannot be used; names the file and line."""

    def __init__(self, path: Path | str, message: str, *, line: int = 0) -> None:
        self.path = Path(path)
        self.line = line
        super().__init__(f"{path}" + (f":{line}" if line else "") + f": {message}")


class ApplyError(UplinkdError):
    """The kernel refused a change; what the message names was not applied."""


class LinkRoutesError(ApplyError):
    """Links the plan uses could not get their routes: the netfilter part was not applied.

    The other links' routes are in place; the caller plans again without these links."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = dict(failed)  # link name -> why its routes were refused
        super().__init__(
            "; ".join(f"link {name}: routes refused: {why}" for name, why in failed.items())
        )


class BackendUnavailableError(UplinkdError):
    """The chosen netfilter backend cannot work on this host."""


class UnknownLinkError(UplinkdError):
    """A request named a link or device that the configuration does not have."""
