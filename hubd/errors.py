"""Errors as values: a stable code, a message saying what happened, a hint saying what to do next.

They are raised where the fact is known and rendered once, at the shell (CLI line, HTTP JSON body).
"""

from __future__ import annotations

# The base and the handle errors are the client package's (its handle parser raises them), re-exported here.
from hubd_client.errors import BadHandle as BadHandle
from hubd_client.errors import DisallowedHost as DisallowedHost
from hubd_client.errors import HubdError as HubdError


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


class DiskFull(HubdError):
    code = "disk_full"
    http_status = 507


class UnknownModel(HubdError):
    """An id or handle that the cache does not know."""

    code = "unknown_model"
    http_status = 404
