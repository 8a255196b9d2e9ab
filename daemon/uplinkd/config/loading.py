"""Loading the configuration: which format a file is in, and the reader for it.

Both formats (uplinkd's TOML in tomlconf.py, Net-ISP-Balance's balance.conf in balanceconf.py)
build one model.Config and pass the same checks (validate.py), so an error reads the same in
either: file, line, key, what is allowed. The format is told apart by content, not by file name.
"""

from __future__ import annotations

import logging
import re
import stat
import tomllib
from pathlib import Path

from .. import trust
from ..errors import ConfigError
from . import balanceconf
from .model import Config
from .tomlconf import BOM, ROOT_KEYS, parse_toml
from .validate import validate

__all__ = ["load", "parse", "parse_toml", "validate"]

log = logging.getLogger("uplinkd")
# Warnings about a readable password already given, so a reload does not repeat them.
_warned: set[str] = set()


def load(path: Path) -> Config:
    """Read a configuration file, TOML or balance.conf, told apart by content.

    It decides what root runs, so it is refused unless root (or the user uplinkd runs as) owns
    it and neither group nor others may write it; checked on the open file, so what is checked
    is what is read (trust.py). One holding the [mail] password that others may read is used,
    with a warning (once per file)."""
    try:
        content, info = trust.read_trusted(path, follow_links=True)
        text = content.decode("utf-8")
    except trust.UntrustedFileError as error:
        raise ConfigError(
            path, f"refused: {error}; whoever may change it decides what root runs"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, f"cannot read the configuration: {error}") from None
    config = parse(text, path)
    if config.mail.password and info.st_mode & stat.S_IROTH:
        warning = (
            f"{path}: holds the [mail] password and others may read it "
            f"(mode {stat.filemode(info.st_mode)}); chmod o-r it"
        )
        if warning not in _warned:
            _warned.add(warning)
            log.warning("%s", warning)
    return config


def parse(text: str, path: Path) -> Config:
    """Parse configuration text of either format, told apart by content, not by file name."""
    text = text.removeprefix(BOM)  # a UTF-8 byte order mark, as some editors write
    try:
        data: dict[str, object] | None = tomllib.loads(text)
        toml_error = ""
    except tomllib.TOMLDecodeError as error:
        data, toml_error = None, str(error)
    tables = data is not None and any(isinstance(v, dict | list) for v in data.values())
    if data is not None and (tables or set(data) & set(ROOT_KEYS)):
        return parse_toml(text, path)
    if balanceconf.has_service_table(text):
        return balanceconf.parse_balance_conf(text, path)
    if data is None and re.search(r"^\s*\[", text, re.MULTILINE):
        return parse_toml(text, path)  # meant as TOML: report tomllib's error and line
    if balanceconf.is_balance_conf(text):
        return balanceconf.parse_balance_conf(text, path)  # options only: "no isp service"
    reason = f"not valid TOML ({toml_error})" if toml_error else "TOML without a [[link]] table"
    raise ConfigError(
        path,
        f"neither an uplinkd TOML configuration ({reason}) nor a Net-ISP-Balance balance.conf "
        "(no service table lines 'NAME DEVICE isp|lan PING-IP')",
    )
