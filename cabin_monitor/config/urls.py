"""URLs as they may be shown: a password in a URL's user info never reaches a log line or a message."""

from __future__ import annotations

import re

# scheme://user:password@host... : the user info ends at the last @ before the path.
_USER_INFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)?(?P<user>[^:@/]*):(?P<password>[^/]*)@")


def redacted(url: str) -> str:
    """``url`` with the password of its user info (``user:password@``) replaced by ``***``."""
    return _USER_INFO.sub(lambda m: f"{m['scheme'] or ''}{m['user']}:***@", url, count=1)


def has_user_info(url: str) -> bool:
    """Whether ``url`` carries user info (``user@`` or ``user:password@``) before its host."""
    rest = url.partition("://")[2] if "://" in url else url
    return "@" in rest.partition("/")[0]
