"""The client's errors: the daemon's code, message and hint, or why the daemon could not be asked."""

from __future__ import annotations


class HubdClientError(Exception):
    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.code = code
        self.message = message
        self.hint = hint


class DaemonUnavailable(HubdClientError):
    """No daemon answered, and the cache held no verified copy to fall back on."""
