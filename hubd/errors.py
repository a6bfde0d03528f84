"""Errors as values: a stable code, a message saying what happened, a hint saying what to do next.

They are raised where the fact is known and rendered once, at the shell (CLI line, HTTP JSON body).
"""

from __future__ import annotations


class HubdError(Exception):
    """Base of every error hubd reports to a user."""

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


class BadRequest(HubdError):
    code = "bad_request"
    http_status = 400


class NotFoundUpstream(HubdError):
    code = "not_found"
    http_status = 404


class NotCached(HubdError):
    """Offline (or upstream unreachable) and the handle has no published entry."""

    code = "not_cached"
    http_status = 503


class ChecksumMismatch(HubdError):
    code = "checksum_mismatch"
    http_status = 409


class VerificationFailed(HubdError):
    code = "verification_failed"
    http_status = 422


class UnsafeArchive(HubdError):
    """The archive tried to write outside its directory, or to create something that is not a plain file."""

    code = "unsafe_archive"
    http_status = 422


class ArchiveTooLarge(UnsafeArchive):
    code = "archive_too_large"


class NotAnArchive(HubdError):
    code = "not_an_archive"
    http_status = 502


class UpstreamError(HubdError):
    code = "upstream_error"
    http_status = 502


class TooManyRedirects(UpstreamError):
    """The upstream redirected in a loop or too deep: its fault, not the request's."""

    code = "too_many_redirects"


class UpstreamTooSlow(UpstreamError):
    """The upstream sent less than the minimum rate (HUBD_MIN_RATE) over a whole window."""

    code = "upstream_too_slow"


class DisallowedHost(HubdError):
    code = "disallowed_host"
    http_status = 400


class DiskFull(HubdError):
    code = "disk_full"
    http_status = 507


class UnknownModel(HubdError):
    """An id or handle that the cache does not know."""

    code = "unknown_model"
    http_status = 404
