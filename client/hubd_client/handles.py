"""Parse and canonicalise model handles into a `Source`: what to download, and the name to cache it under.

The rules every handle obeys are here; what differs by kind is one row of `hubd_client.kinds.KINDS`.
Accepted forms (see docs/handles.md for the rules):

- ``https://tfhub.dev/<publisher>/<model...>/<version>`` (scheme optional, trailing slash and an existing
  ``?tf-hub-format=`` query ignored). Fetched, as ``tensorflow_hub`` does, from the handle plus
  ``?tf-hub-format=compressed``; tfhub.dev answers with a redirect to Kaggle, Kaggle with one to storage.
- ``https://www.kaggle.com/models/<owner>/<model>/<framework>/<variation>/<version>`` and the long form
  Kaggle's own pages use (``.../frameworks/<f>/variations/<v>/versions/<n>``). The framework is
  case-insensitive on Kaggle, so it is lower-cased in the canonical name.
- any other ``https://`` URL: a server speaking the TF Hub hosting protocol.
- a local directory: returned as it is, never copied.

A handle never carries a secret: user:password@ in the host part, any query other than ``tf-hub-format=`` and a
fragment are refused, because handles are stored in refs and listed to every user of the cache.

Servers are compared as *origins* (scheme, host, port): a list entry without a port means the scheme's default
port, so an unprivileged local user, who can only listen on high ports, cannot stand in for an allowed server.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from urllib.parse import SplitResult, urlsplit

from hubd_client.errors import BadHandle, DisallowedHost
from hubd_client.kinds import KINDS, HubKind, KindTable, Location, is_dir
from hubd_client.kinds import Source as Source
from hubd_client.kinds import SourceKind as SourceKind

ACCEPTED_FORMS = KINDS.accepted_forms

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_QUERY = re.compile(r"^(tf-hub-format=[A-Za-z0-9_-]*)?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]
"""(scheme, host, port) of a URL, the port made explicit: what servers are compared by."""


class AnyHost(frozenset[str]):
    """For look-ups that reach no network (reading the cache): any host passes the plain-http check."""

    def __contains__(self, item: object) -> bool:
        return True


def parse_handle(handle: str, http_hosts: frozenset[str] = frozenset(), kinds: KindTable = KINDS) -> Source:
    """Turn whatever a user passed into a `Source`, or raise `BadHandle` naming the accepted forms.

    The checks every kind shares (scheme, credentials, plain http, path segments) are made here; the host then
    picks the row of `kinds` that parses the rest."""
    forms = f"pass one of: {kinds.accepted_forms}"
    raw = handle.strip()
    if not raw:
        raise BadHandle("empty handle", forms)
    if is_local(raw, kinds):
        return kinds.local.source(Location(raw))
    if "://" not in raw:
        if not _names_hub_host(raw, kinds):
            raise BadHandle(f"not a model handle: {handle!r}", forms)
        raw = "https://" + raw
    parts = _split(raw, BadHandle, "not a model handle", forms)
    _refuse_secrets(parts.netloc, parts.query, parts.fragment, raw)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not host:
        raise BadHandle(f"handle has no host: {handle!r}", forms)
    if scheme not in _DEFAULT_PORTS:
        raise BadHandle(f"unsupported scheme {scheme!r} in {handle!r}", forms)
    port = _port(parts, handle)
    if scheme == "http" and not http_allowed(host, port, http_hosts):
        raise DisallowedHost(
            f"plain http is refused for {host}:{port}: {handle!r}",
            "use https://, or allow the server with HUBD_HTTP_HOSTS / --http-host (HOST for port 80, HOST:PORT)",
        )
    segments = tuple(_path_segments(parts.path, handle))
    return kinds.for_host(host).source(Location(handle, scheme, parts.netloc.lower(), segments))


def is_local(handle: str, kinds: KindTable = KINDS) -> bool:
    """Whether `handle` names a local directory rather than a remote model: the one rule for the daemon and
    the client alike. Absolute, ./, ../, ~ and file:// are local; a scheme-less name whose first segment is
    a hub's host (tfhub.dev, kaggle.com) is always a hub handle, even if a directory of that name exists under
    the current directory (anyone may create one in /tmp); any other scheme-less name is local when it is a
    directory."""
    raw = handle.strip()
    if raw.startswith(("/", "./", "../", "~", "file://")):
        return True
    return "://" not in raw and not _names_hub_host(raw, kinds) and is_dir(raw)


def _names_hub_host(raw: str, kinds: KindTable) -> bool:
    return raw.split("/", 1)[0].lower() in kinds.hosts


def _split(url: str, error: type[BadHandle] | type[DisallowedHost], what: str, hint: str) -> SplitResult:
    """urlsplit, with its ValueError (a bracket out of place; a host whose characters NFKC-normalise to '/',
    '?', '#' or '@') turned into `error`."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise error(f"{what}: {url!r} ({exc})", hint) from None


def _refuse_secrets(netloc: str, query: str, fragment: str, handle: str) -> None:
    """Handles are stored and listed to every user: refuse anything that looks like a credential in one."""
    if "@" in netloc:
        raise BadHandle(
            "a handle may not contain credentials (user:password@); it is stored and listed to every user",
            "remove the user name and password; hubd fetches only public models (use a mirror for private ones)",
        )
    if not _QUERY.match(query) or fragment:
        raise BadHandle(
            "a handle may not carry a query (other than tf-hub-format=) or a fragment: it could hold a token, "
            "and handles are stored and listed to every user",
            "remove everything after '?' or '#' from the handle",
        )


def _port(parts: SplitResult, url: str) -> int:
    try:
        port = parts.port
    except ValueError:
        raise BadHandle(f"invalid port in {url!r}", f"pass one of: {ACCEPTED_FORMS}") from None
    return port if port is not None else _DEFAULT_PORTS.get(parts.scheme.lower(), 0)


def origin(url: str) -> Origin:
    """The (scheme, host, port) of `url`; DisallowedHost if it has none that hubd could use."""
    parts = _split(url, DisallowedHost, "not a usable http(s) URL", "the upstream server is misconfigured")
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        raise DisallowedHost(f"not a usable http(s) URL: {url!r}", "the upstream server is misconfigured")
    try:
        port = parts.port
    except ValueError:
        raise DisallowedHost(f"invalid port in {url!r}", "the upstream server is misconfigured") from None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def _split_entry(entry: str, scheme: str) -> tuple[str, int]:
    """A host-list entry (``host``, ``host:port``, ``[v6]:port``) as (host pattern, port); no port: the default."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    if not port:
        return host, _DEFAULT_PORTS.get(scheme, 0)
    return host, int(port) if port.isdigit() else -1


def http_allowed(host: str, port: int, http_hosts: frozenset[str]) -> bool:
    """Whether plain http to host:port is allowed: an entry ``host:port``, or ``host`` for port 80."""
    if isinstance(http_hosts, AnyHost):
        return True
    host = host.lower()
    return any(_split_entry(entry, "http") == (host, port) for entry in http_hosts)


def origin_allowed(target: Origin, patterns: list[str]) -> bool:
    """Whether an https origin matches an allowed-host pattern (fnmatch on the host; no port: 443)."""
    scheme, host, port = target
    for entry in patterns:
        pattern, entry_port = _split_entry(entry, scheme)
        if entry_port == port and fnmatchcase(host, pattern):
            return True
    return False


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


def kaggle_canonical_from_url(url: str, mirror: str | None = None) -> str | None:
    """The canonical Kaggle name behind a redirect URL (`canonical_in_url` for the Kaggle row)."""
    return canonical_in_url(KINDS["kaggle"], url, mirror)


def canonical_in_url(kind: HubKind, url: str, mirror: str | None = None) -> str | None:
    """The canonical name of `kind` that a redirect URL names, so a handle and its twin share a ref.

    tfhub.dev answers a handle with a redirect to its Kaggle page (``/models/<owner>/<model>/frameworks/...``);
    a configured mirror that keeps the hub's URL scheme is read the same way. Only those two speak for the
    kind's names: the kind's own hosts over https, and the mirror's exact origin (scheme, host and port) and path.
    """
    try:
        where = origin(url)
    except DisallowedHost:
        return None
    path = urlsplit(url).path
    if where not in kind.origins:
        if not mirror:
            return None
        try:
            mirror_origin = origin(mirror)
        except DisallowedHost:
            return None
        prefix = urlsplit(mirror).path.rstrip("/")
        if where != mirror_origin or not path.startswith(prefix + "/"):
            return None
        path = path[len(prefix) :]
    try:
        return kind.parse(Location(url, where[0], where[1], tuple(_path_segments(path, url)))).canonical
    except BadHandle:
        return None


def twin_name(
    source: Source, redirects: list[str], mirror: str | None = None, kinds: KindTable = KINDS
) -> str | None:
    """The twin's canonical name that a download of `source` revealed in its redirects (the first hop is the
    download URL itself), or None: its kind's `twin` rule. The twin is only ever added beside the handle's own
    name, never in its place."""
    rule = kinds[source.kind].twin
    if rule is None:
        return None
    names = (canonical_in_url(kinds[rule], url, mirror) for url in redirects[1:])
    twin = next(filter(None, names), None)
    return twin if twin and twin != source.canonical else None


def check_redirect(url: str, origin_url: str, allowed: list[str], http_hosts: frozenset[str]) -> None:
    """Refuse a redirect that leaves the download's origin (scheme, host and port) for one that is not allowed,
    or that drops to plain http. A redirect within the origin is always followed."""
    target = origin(url)
    if target == origin(origin_url):
        return
    scheme, host, port = target
    downgrade = urlsplit(origin_url).scheme.lower() == "https"
    if scheme == "http" and (downgrade or not http_allowed(host, port, http_hosts)):
        raise DisallowedHost(f"redirect to plain http refused: {url!r}", "only https redirects are followed")
    if not origin_allowed(target, allowed):
        raise DisallowedHost(
            f"redirect to {scheme}://{host}:{port} is not allowed",
            "add it to HUBD_ALLOWED_HOSTS (HOST for the default port, HOST:PORT otherwise) if it is a trusted "
            "model store",
        )


def handle_from_mirror_path(path: str, kinds: KindTable = KINDS) -> str:
    """The handle a hosting-protocol path on a hubd LAN mirror stands for (the inverse of `mirror_path`)."""
    segments = _path_segments("/" + path.strip("/"), path)
    kind = kinds.for_mirror_path(segments)
    if kind is None:
        raise BadHandle(f"no hub is served at {path!r}", f"pass one of: {kinds.accepted_forms}")
    return f"{kind.home}/{'/'.join(segments)}"
