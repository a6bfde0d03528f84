"""The daemon's log: one format, a level, and no second timestamp under journald.

journald stamps every line itself and sets JOURNAL_STREAM for a service whose stderr it reads; then the lines
carry no time of their own. At `debug` an access log (one line per request, `hubd.access`) joins in.
"""

from __future__ import annotations

import logging
import os

from hubd.errors import BadRequest

LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG = logging.getLogger("hubd.access")
ACCESS_FORMAT = '"%r" %s %b %Tfs "%{User-Agent}i"'
"""aiohttp's access-log fields, without its own timestamp (%t) and remote address (a Unix socket has none)."""


def configure(level: str | None) -> None:
    name = (level or os.environ.get("HUBD_LOG_LEVEL") or "info").lower()
    if name not in LEVELS:
        raise BadRequest(
            f"unknown log level {name!r}", f"one of: {', '.join(LEVELS)} (--log-level, HUBD_LOG_LEVEL)"
        )
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    level_no = getattr(logging, name.upper())
    # Libraries (watchdog, asyncio) say little above info; their debug chatter would drown hubd's own.
    logging.basicConfig(
        level=max(level_no, logging.INFO), format=f"{stamp}%(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("hubd").setLevel(level_no)


def access_log() -> logging.Logger | None:
    """The access logger when the level is debug, else None (aiohttp then skips formatting entirely)."""
    return ACCESS_LOG if logging.getLogger("hubd").isEnabledFor(logging.DEBUG) else None
