"""Credentials of a PACS: from the environment or a netrc-style file, never from params,
the command line or a log."""

from __future__ import annotations

import netrc
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from medimg.errors import ConfigError

USER_ENV = "MEDIMG_PACS_USER"
PASSWORD_ENV = "MEDIMG_PACS_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)  # never shown, logged or written

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password=<hidden>)"


def host_of(url: str) -> str:
    """The host part of a URL (what a netrc ``machine`` line names)."""
    return urlsplit(url).hostname or ""


def credentials_for(host: str, file: Path) -> Credentials | None:
    """``$MEDIMG_PACS_USER`` and ``$MEDIMG_PACS_PASSWORD`` when both are set; else the
    ``machine host login ... password ...`` entry of ``file`` (netrc format), which must be
    readable by its owner only; None when neither names one.

    Raises:
        ConfigError: the file is readable by others, or cannot be parsed (the message
            names the file and the line, never its content).
    """
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user and password is not None:
        return Credentials(user, password)
    if not file.is_file():
        return None
    if stat.S_IMODE(file.stat().st_mode) & 0o077:
        raise ConfigError(f"{file}: readable by other users; run: chmod 600 {file}")
    try:
        entry = netrc.netrc(str(file)).authenticators(host)
    except netrc.NetrcParseError as e:
        raise ConfigError(f"{file}: not a netrc file (line {e.lineno})") from None
    if entry is None:
        return None
    login, _account, secret = entry
    return Credentials(login or "", secret or "")
