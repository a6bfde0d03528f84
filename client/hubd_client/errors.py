"""The client's errors: the daemon's code, message and hint, or why the daemon could not be asked.

`HubdError` and the handle errors (`BadHandle`, `DisallowedHost`) live here, standard library only, because the
handle parser (`hubd_client.handles`) raises them on both sides; the daemon's `hubd.errors` re-exports these very
classes and builds its other errors on `HubdError`, so its HTTP statuses and error JSON cover them unchanged.
"""

from __future__ import annotations


class HubdError(Exception):
    """Base of every error hubd reports to a user (the daemon's errors in hubd.errors derive from it)."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadHandle(HubdError):
    code = "bad_handle"
    http_status = 400


class DisallowedHost(HubdError):
    code = "disallowed_host"
    http_status = 400


class HubdClientError(Exception):
    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.code = code
        self.message = message
        self.hint = hint


class DaemonUnavailable(HubdClientError):
    """No daemon answered, and the cache held no verified copy to fall back on."""
