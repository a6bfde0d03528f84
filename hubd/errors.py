"""Errors as values: a stable code, a message saying what happened, a hint saying what to do next.

They are raised where the fact is known and rendered once, at the shell (CLI line, HTTP JSON body). Every code
the daemon answers with is defined here and listed in `REGISTRY`, so a client turns a code back into its class
from one explicit table (`error_class`), and the codes' HTTP statuses are in one file.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

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


class MirrorUnsigned(UpstreamError):
    """A mirror that shares our key (HUBD_MIRROR_KEY_FILE) answered without a valid signature for this handle."""

    code = "mirror_unsigned"


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


class RefConflict(HubdError):
    """A handle already names another verified model: a cached handle never silently changes what it loads."""

    code = "ref_conflict"
    http_status = 409


class PinnedModel(HubdError):
    """`rm` of a model a manifest pins: refused unless forced, so a manifest's model does not vanish unnoticed."""

    code = "pinned"
    http_status = 409


class LayoutTooNew(HubdError):
    """The cache's layout version is newer than this hubd understands (or unreadable): refused, never guessed."""

    code = "cache_layout_unsupported"
    http_status = 503


class TooManyExports(HubdError):
    """One user (or TCP peer) already runs as many exports as it may (`routes.EXPORTS_PER_USER`)."""

    code = "too_many_exports"
    http_status = 429


class AnswerBrokenOff(HubdError):
    """The daemon closed the connection in the middle of an answer (an export whose model failed its re-hash)."""

    code = "answer_broken_off"
    http_status = 502


class DaemonNotAnswering(HubdError):
    """Something accepted the connection but sent no answer in time: a hung or overloaded daemon."""

    code = "daemon_not_answering"
    http_status = 504


class UntrustedDaemonSocket(HubdError):
    code = "untrusted_socket"
    http_status = 403


class BadBundle(HubdError):
    """The bundle as a whole cannot be read: not a bundle, a damaged header, a newer format."""

    code = "bad_bundle"
    http_status = 422


class Stalled(HubdError):
    code = "stalled"
    http_status = 408


class AliasConflict(HubdError):
    """Two manifests give one name to different models."""

    code = "alias_conflict"
    http_status = 409


class QuotaExceeded(HubdError):
    """A download that the quota cannot hold besides what may not be evicted."""

    code = "over_quota"
    http_status = 507


class Tampered(VerificationFailed):
    """What the bucket holds does not match what its ref names: refused, never published."""

    code = "bucket_tampered"


class Forbidden(HubdError):
    code = "forbidden"
    http_status = 403


class MisdirectedHost(HubdError):
    code = "bad_host"
    http_status = 400


class RequestTimeout(HubdError):
    code = "request_timeout"
    http_status = 408


class CollectorBusy(HubdError):
    code = "busy"
    http_status = 409


class UntrustedCache(HubdError):
    """The cache directory, or one above it, could be changed by another user; or it cannot be made at all."""

    code = "cache_untrusted"
    http_status = 503


REGISTRY: tuple[type[HubdError], ...] = (
    HubdError,
    BadHandle,
    DisallowedHost,
    BadRequest,
    NotFoundUpstream,
    NotCached,
    ChecksumMismatch,
    VerificationFailed,
    UnsafeArchive,
    ArchiveTooLarge,
    NotAnArchive,
    UpstreamError,
    TooManyRedirects,
    MirrorUnsigned,
    UpstreamTooSlow,
    DiskFull,
    UnknownModel,
    RefConflict,
    PinnedModel,
    LayoutTooNew,
    TooManyExports,
    Forbidden,
    MisdirectedHost,
    RequestTimeout,
    BadBundle,
    Stalled,
    QuotaExceeded,
    AliasConflict,
    UntrustedCache,
    CollectorBusy,
    Tampered,
    UntrustedDaemonSocket,
    DaemonNotAnswering,
    AnswerBrokenOff,
)
"""Every error class by hand, so what a code means never depends on which modules happen to be imported."""

BY_CODE: Mapping[str, type[HubdError]] = MappingProxyType({cls.code: cls for cls in REGISTRY})


def error_class(code: str) -> type[HubdError]:
    """The class of an error code sent by the daemon; the base class for a code this version does not know."""
    return BY_CODE.get(code, HubdError)
