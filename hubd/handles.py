"""Parse and canonicalise model handles into a `Source`: what to download, and the name to cache it under.

Accepted forms (see docs/handles.md for the rules):

- ``https://tfhub.dev/<publisher>/<model...>/<version>`` (scheme optional, trailing slash and an existing
  ``?tf-hub-format=`` query ignored). Fetched, as ``tensorflow_hub`` does, from the handle plus
  ``?tf-hub-format=compressed``; tfhub.dev answers with a redirect to Kaggle, Kaggle with one to storage.
- ``https://www.kaggle.com/models/<owner>/<model>/<framework>/<variation>/<version>`` and the long form
  Kaggle's own pages use (``.../frameworks/<f>/variations/<v>/versions/<n>``). The framework is
  case-insensitive on Kaggle, so it is lower-cased in the canonical name.
- any other ``https://`` URL: a server speaking the TF Hub hosting protocol.
- a local directory: returned as it is, never copied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from hubd.errors import BadHandle, DisallowedHost

ACCEPTED_FORMS = (
    "https://tfhub.dev/<publisher>/<model>/<version>, "
    "https://www.kaggle.com/models/<owner>/<model>/<framework>/<variation>/<version>, "
    "any https:// URL of a TF Hub hosting-protocol server, or a local directory"
)

_TFHUB_HOSTS = {"tfhub.dev", "www.tfhub.dev"}
_KAGGLE_HOSTS = {"kaggle.com", "www.kaggle.com"}
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION = re.compile(r"^[0-9]+$")

SourceKind = Literal["tfhub", "kaggle", "url", "local"]


@dataclass(frozen=True)
class Source:
    """A parsed handle: where its archive lives and the one name it is cached under.

    A plain dataclass, not pydantic: the client library parses handles too (for its offline look-up), and
    `import hubd_client` must stay standard-library only.
    """

    kind: SourceKind
    handle: str
    """The handle as the caller wrote it."""
    canonical: str
    """The cache name: scheme-less, query-less, normalised (``tfhub.dev/google/nnlm-en-dim128/2``)."""
    url: str = ""
    """The archive URL (hosting protocol: ``?tf-hub-format=compressed``); empty for local paths."""
    mirror_path: str = ""
    """Path under a configured mirror (``<publisher>/<model>/<version>``); empty when no mirror applies."""
    local_path: str = ""

    @property
    def ref_key(self) -> str:
        """A file-name-safe key for this canonical name, used for refs and locks."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:32]

    def download_url(self, mirror: str | None) -> str:
        if mirror and self.mirror_path:
            return f"{mirror}/{self.mirror_path}?tf-hub-format=compressed"
        return self.url


class AnyHost(frozenset[str]):
    """For look-ups that reach no network (reading the cache): any host passes the plain-http check."""

    def __contains__(self, item: object) -> bool:
        return True


def parse_handle(handle: str, http_hosts: frozenset[str] = frozenset()) -> Source:
    """Turn whatever a user passed into a `Source`, or raise `BadHandle` naming the accepted forms."""
    raw = handle.strip()
    if not raw:
        raise BadHandle("empty handle", f"pass one of: {ACCEPTED_FORMS}")
    if raw.startswith(("/", "./", "../", "~")) or raw.startswith("file://"):
        return _local_source(raw)
    if "://" not in raw:
        first = raw.split("/", 1)[0].lower()
        if first in _TFHUB_HOSTS | _KAGGLE_HOSTS:
            raw = "https://" + raw
        elif _is_dir(raw):
            return _local_source(raw)
        else:
            raise BadHandle(f"not a model handle: {handle!r}", f"pass one of: {ACCEPTED_FORMS}")
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not host:
        raise BadHandle(f"handle has no host: {handle!r}", f"pass one of: {ACCEPTED_FORMS}")
    if scheme == "http":
        if host not in http_hosts:
            raise DisallowedHost(
                f"plain http is refused for {host}: {handle!r}",
                "use https://, or allow the host with HUBD_HTTP_HOSTS / --http-host",
            )
    elif scheme != "https":
        raise BadHandle(f"unsupported scheme {scheme!r} in {handle!r}", f"pass one of: {ACCEPTED_FORMS}")
    segments = _path_segments(parts.path, handle)
    if host in _TFHUB_HOSTS:
        return _tfhub_source(handle, segments)
    if host in _KAGGLE_HOSTS:
        return _kaggle_source(handle, segments)
    return _url_source(handle, scheme, parts.netloc.lower(), segments)


def _path_segments(path: str, handle: str) -> list[str]:
    if "%" in path:
        raise BadHandle(
            f"percent-encoded characters are not allowed in a handle path: {handle!r}",
            "write the path in plain characters",
        )
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT.match(segment):
            raise BadHandle(
                f"invalid path segment {segment!r} in {handle!r}",
                "handle paths use letters, digits, '.', '_' and '-' only",
            )
    return segments


def _tfhub_source(handle: str, segments: list[str]) -> Source:
    if len(segments) < 3 or not _VERSION.match(segments[-1]):
        raise BadHandle(
            f"a tfhub.dev handle needs a publisher, a model and a numeric version: {handle!r}",
            "for example https://tfhub.dev/google/nnlm-en-dim128/2",
        )
    path = "/".join(segments)
    return Source(
        kind="tfhub",
        handle=handle,
        canonical=f"tfhub.dev/{path}",
        url=f"https://tfhub.dev/{path}?tf-hub-format=compressed",
        mirror_path=path,
    )


def _kaggle_source(handle: str, segments: list[str]) -> Source:
    if segments[:1] != ["models"]:
        raise BadHandle(f"not a Kaggle model handle: {handle!r}", f"pass one of: {ACCEPTED_FORMS}")
    rest = segments[1:]
    if len(rest) == 8 and (rest[2], rest[4], rest[6]) == ("frameworks", "variations", "versions"):
        rest = [rest[0], rest[1], rest[3], rest[5], rest[7]]
    if len(rest) != 5 or not _VERSION.match(rest[4]):
        raise BadHandle(
            f"a Kaggle handle needs owner, model, framework, variation and a numeric version: {handle!r}",
            "for example https://www.kaggle.com/models/google/nnlm/tensorFlow2/en-dim128/2",
        )
    owner, model, framework, variation, version = rest
    framework = framework.lower()
    long_path = f"{owner}/{model}/frameworks/{framework}/variations/{variation}/versions/{version}"
    short_path = f"{owner}/{model}/{framework}/{variation}/{version}"
    return Source(
        kind="kaggle",
        handle=handle,
        canonical=f"kaggle.com/models/{short_path}",
        url=f"https://www.kaggle.com/models/{long_path}?tf-hub-format=compressed",
        mirror_path=f"models/{short_path}",
    )


def _url_source(handle: str, scheme: str, netloc: str, segments: list[str]) -> Source:
    path = "/".join(segments)
    base = urlunsplit((scheme, netloc, "/" + path, "", ""))
    return Source(
        kind="url",
        handle=handle,
        canonical=f"{netloc}/{path}",
        url=f"{base}?tf-hub-format=compressed",
    )


def _local_source(raw: str) -> Source:
    try:
        path = Path(raw.removeprefix("file://")).expanduser()
    except RuntimeError:  # ~name of a user that does not exist
        path = Path(raw)
    if not _is_dir(str(path)):
        raise BadHandle(f"no such model directory: {raw!r}", "pass an existing SavedModel directory")
    resolved = str(path.resolve())
    return Source(kind="local", handle=raw, canonical=resolved, local_path=resolved)


def _is_dir(path: str) -> bool:
    """Like Path.is_dir, but a name too long or otherwise unusable is simply not a directory."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def kaggle_canonical_from_url(url: str, mirror_hosts: frozenset[str] = frozenset()) -> str | None:
    """The canonical Kaggle name behind a redirect URL, so a tfhub.dev handle and its Kaggle twin share a ref.

    tfhub.dev answers a handle with a redirect to its Kaggle page (``/models/<owner>/<model>/frameworks/...``);
    a mirror that keeps Kaggle's URL scheme is read the same way.
    """
    parts = urlsplit(url)
    if (parts.hostname or "").lower() not in _KAGGLE_HOSTS | mirror_hosts:
        return None
    try:
        return _kaggle_source(url, _path_segments(parts.path, url)).canonical
    except BadHandle:
        return None


def host_allowed(host: str, patterns: list[str]) -> bool:
    host = host.lower()
    return any(fnmatchcase(host, pattern.lower()) for pattern in patterns)


def check_redirect(url: str, origin_host: str, allowed: list[str], http_hosts: frozenset[str]) -> None:
    """Refuse a redirect that leaves the origin host for one that is not allowed, or drops to plain http."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise DisallowedHost(f"redirect to an unusable URL: {url!r}", "the upstream server is misconfigured")
    if parts.scheme == "http" and host not in http_hosts:
        raise DisallowedHost(f"redirect to plain http refused: {url!r}", "only https redirects are followed")
    if host != origin_host.lower() and not host_allowed(host, allowed):
        raise DisallowedHost(
            f"redirect to host {host!r} is not allowed",
            "add it to HUBD_ALLOWED_HOSTS if it is a trusted model store",
        )


def handle_from_mirror_path(path: str) -> str:
    """The handle a hosting-protocol path on a hubd LAN mirror stands for (the inverse of `mirror_path`)."""
    segments = _path_segments("/" + path.strip("/"), path)
    if segments[:1] == ["models"]:
        return "https://www.kaggle.com/" + "/".join(segments)
    return "https://tfhub.dev/" + "/".join(segments)
