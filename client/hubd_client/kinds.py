"""What a handle can name: the table of hub kinds, and the `Source` a handle parses to.

Each kind (tfhub.dev, Kaggle, any server of the TF Hub hosting protocol, a local directory) is one `HubKind` row
holding everything hubd does differently for it: how its handles parse into a canonical name and an archive URL,
the spellings tensorflow_hub users write for it (links in tfhub_modules/), its path under a hubd LAN mirror, and
which other kind's name a redirect of its download may reveal (its twin). `hubd_client.handles`,
`hubd.tfhub_view`, `hubd.server.mirror` and `hubd.engine` consult `KINDS` and name no kind themselves, so a new
hub is one more row here (see docs/handles.md). Standard library only: the client parses handles too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlunsplit

from hubd_client.errors import BadHandle
from hubd_client.layout import ref_key

SourceKind = str
"""The name of a row in `KINDS`: "tfhub", "kaggle", "url" or "local"."""

_VERSION = re.compile(r"^[0-9]+$")


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
        return ref_key(self.canonical)

    def download_url(self, mirror: str | None) -> str:
        if mirror and self.mirror_path:
            return f"{mirror}/{self.mirror_path}?tf-hub-format=compressed"
        return self.url


@dataclass(frozen=True)
class Location:
    """A handle as `hubd_client.handles.parse_handle` took it apart (scheme, secrets, host and path checked)."""

    handle: str
    """As the caller wrote it (a local path: stripped)."""
    scheme: str = ""
    netloc: str = ""
    """Lower-case host[:port]."""
    segments: tuple[str, ...] = ()
    """The path's segments, each checked to be plain letters, digits, '.', '_' and '-'."""


@dataclass(frozen=True)
class HubKind:
    """One kind of handle, and everything that differs between kinds."""

    name: SourceKind
    form: str
    """The accepted form, as error messages name it."""
    parse: Callable[[Location], Source]
    """The Source of a handle of this kind (its canonical name and archive URL), or BadHandle."""
    hosts: frozenset[str] = frozenset()
    """The handle hosts that are this kind's; they are recognised without a scheme too (``tfhub.dev/a/b/1``)."""
    any_host: bool = False
    """The hosting-protocol row: any https host no other row claims."""
    fetched: bool = True
    """False for local directories: used where they are, never downloaded, cached or linked."""
    needs_allowed_host: bool = False
    """Its host must be allowed (HUBD_ALLOWED_HOSTS) before anything is fetched from it."""
    spellings: Callable[[Source], frozenset[str]] = field(default=lambda source: frozenset())
    """Handle strings besides the one given that name this model; tfhub_modules/ links each (with and without
    a trailing slash), since tensorflow_hub keys its cache on the string exactly as written."""
    mirror_prefix: str | None = None
    """A hubd LAN mirror serves this kind at the canonical name's path (``mirror_path``), whose first segment is
    this ("" for any); None: mirrors do not serve it."""
    home: str = ""
    """Where handles of this kind live (``https://tfhub.dev``): a canonical name's path appended is a handle."""
    twin: SourceKind | None = None
    """The kind whose canonical name a redirect of this kind's download reveals (tfhub.dev redirects to Kaggle):
    the entry is recorded under both names, so either handle hits."""

    def source(self, where: Location) -> Source:
        """`parse`, with the mirror path filled in from the canonical name."""
        source = self.parse(where)
        return replace(source, mirror_path=self.mirror_path(source.canonical))

    def mirror_path(self, canonical: str) -> str:
        """The path under a hubd mirror: the canonical name without its host; "" when mirrors do not serve it."""
        return canonical.partition("/")[2] if self.mirror_prefix is not None else ""

    def handle_for(self, canonical: str) -> str:
        """A handle that parses back to `canonical` (what a twin's ref records as its handle)."""
        return f"{self.home}/{canonical.partition('/')[2]}" if self.home else f"https://{canonical}"

    @property
    def origins(self) -> frozenset[tuple[str, str, int]]:
        """The https origins that speak for this kind's names (in a redirect: `twin`)."""
        return frozenset(("https", host, 443) for host in self.hosts)


class KindTable:
    """The rows, looked up by name, by host and by mirror path; checked to be unambiguous when built."""

    def __init__(self, rows: Iterable[HubKind]) -> None:
        self.rows = tuple(rows)
        self._by_name = {row.name: row for row in self.rows}
        self._by_host = {host: row for row in self.rows for host in row.hosts}
        if len(self._by_name) != len(self.rows):
            raise ValueError("two hub kinds share a name")
        if len(self._by_host) != sum(len(row.hosts) for row in self.rows):
            raise ValueError("two hub kinds claim one host")
        hosting = [row for row in self.rows if row.any_host]
        local = [row for row in self.rows if not row.fetched]
        if len(hosting) != 1 or len(local) != 1:
            raise ValueError("a kind table needs exactly one any-host row and one local row")
        self.hosting, self.local = hosting[0], local[0]
        for row in self.rows:
            if row.mirror_prefix is not None and not row.home:
                raise ValueError(f"hub kind {row.name} is served by mirrors but has no home")
            if row.twin is not None and row.twin not in self._by_name:
                raise ValueError(f"hub kind {row.name} names an unknown twin {row.twin!r}")

    def __getitem__(self, name: SourceKind) -> HubKind:
        return self._by_name[name]

    def __iter__(self) -> Iterator[HubKind]:
        return iter(self.rows)

    @property
    def hosts(self) -> frozenset[str]:
        """Every host a row claims: a scheme-less handle starting with one is a hub handle, never a path."""
        return frozenset(self._by_host)

    def for_host(self, host: str) -> HubKind:
        return self._by_host.get(host, self.hosting)

    def for_canonical(self, canonical: str) -> HubKind:
        """The row of a canonical name (its first segment is the host it was parsed from; not for local paths)."""
        return self.for_host(canonical.partition("/")[0])

    def for_mirror_path(self, segments: Sequence[str]) -> HubKind | None:
        """The row a hubd mirror serves at this path: the one whose prefix is its first segment, else the one
        with no prefix."""
        served = [row for row in self.rows if row.mirror_prefix is not None]
        first = segments[0] if segments else ""
        return next((r for r in served if r.mirror_prefix and r.mirror_prefix == first), None) or next(
            (r for r in served if r.mirror_prefix == ""), None
        )

    @property
    def accepted_forms(self) -> str:
        forms = [row.form for row in self.rows]
        return ", ".join(forms[:-1]) + ", or " + forms[-1] if len(forms) > 1 else forms[0]


def _tfhub(where: Location) -> Source:
    segments = where.segments
    if len(segments) < 3 or not _VERSION.match(segments[-1]):
        raise BadHandle(
            f"a tfhub.dev handle needs a publisher, a model and a numeric version: {where.handle!r}",
            "for example https://tfhub.dev/google/nnlm-en-dim128/2",
        )
    path = "/".join(segments)
    return Source(
        kind="tfhub",
        handle=where.handle,
        canonical=f"tfhub.dev/{path}",
        url=f"https://tfhub.dev/{path}?tf-hub-format=compressed",
    )


def _kaggle(where: Location) -> Source:
    """The short form (``models/<owner>/<model>/<framework>/<variation>/<version>``) or the long one Kaggle's own
    pages use (``.../frameworks/<f>/variations/<v>/versions/<n>``); the framework is case-insensitive on Kaggle,
    so it is lower-cased in the canonical name."""
    segments = list(where.segments)
    if segments[:1] != ["models"]:
        raise BadHandle(f"not a Kaggle model handle: {where.handle!r}", f"pass one of: {KINDS.accepted_forms}")
    rest = segments[1:]
    if len(rest) == 8 and (rest[2], rest[4], rest[6]) == ("frameworks", "variations", "versions"):
        rest = [rest[0], rest[1], rest[3], rest[5], rest[7]]
    if len(rest) != 5 or not _VERSION.match(rest[4]):
        raise BadHandle(
            f"a Kaggle handle needs owner, model, framework, variation and a numeric version: {where.handle!r}",
            "for example https://www.kaggle.com/models/google/nnlm/tensorFlow2/en-dim128/2",
        )
    owner, model, framework, variation, version = rest
    framework = framework.lower()
    long_path = f"{owner}/{model}/frameworks/{framework}/variations/{variation}/versions/{version}"
    return Source(
        kind="kaggle",
        handle=where.handle,
        canonical=f"kaggle.com/models/{owner}/{model}/{framework}/{variation}/{version}",
        url=f"https://www.kaggle.com/models/{long_path}?tf-hub-format=compressed",
    )


def _kaggle_spellings(source: Source) -> frozenset[str]:
    """Kaggle's pages and tensorflow_hub's docs write the framework in several cases, short form and long."""
    owner, model, framework, variation, version = source.canonical.split("/")[2:]
    names = {f"https://{source.canonical}"}
    for flavour in {framework, "tensorFlow2", "TensorFlow2", "tensorflow2"}:
        short = f"{owner}/{model}/{flavour}/{variation}/{version}"
        long = f"{owner}/{model}/frameworks/{flavour}/variations/{variation}/versions/{version}"
        names |= {f"https://www.kaggle.com/models/{short}", f"https://www.kaggle.com/models/{long}"}
    return frozenset(names)


def _hosting(where: Location) -> Source:
    path = "/".join(where.segments)
    base = urlunsplit((where.scheme, where.netloc, "/" + path, "", ""))
    return Source(
        kind="url", handle=where.handle, canonical=f"{where.netloc}/{path}", url=f"{base}?tf-hub-format=compressed"
    )


def _local(where: Location) -> Source:
    raw = where.handle
    try:
        path = Path(raw.removeprefix("file://")).expanduser()
    except RuntimeError:  # ~name of a user that does not exist
        path = Path(raw)
    if not is_dir(str(path)):
        raise BadHandle(f"no such model directory: {raw!r}", "pass an existing SavedModel directory")
    resolved = str(path.resolve())
    return Source(kind="local", handle=raw, canonical=resolved, local_path=resolved)


def is_dir(path: str) -> bool:
    """Like Path.is_dir, but a name too long or otherwise unusable is simply not a directory."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def _canonical_url(source: Source) -> frozenset[str]:
    return frozenset({f"https://{source.canonical}"})


TFHUB = HubKind(
    name="tfhub",
    form="https://tfhub.dev/<publisher>/<model>/<version>",
    parse=_tfhub,
    hosts=frozenset({"tfhub.dev", "www.tfhub.dev"}),
    spellings=_canonical_url,
    mirror_prefix="",
    home="https://tfhub.dev",
    twin="kaggle",
)
KAGGLE = HubKind(
    name="kaggle",
    form="https://www.kaggle.com/models/<owner>/<model>/<framework>/<variation>/<version>",
    parse=_kaggle,
    hosts=frozenset({"kaggle.com", "www.kaggle.com"}),
    spellings=_kaggle_spellings,
    mirror_prefix="models",
    home="https://www.kaggle.com",
)
HOSTING = HubKind(
    name="url",
    form="any https:// URL of a TF Hub hosting-protocol server",
    parse=_hosting,
    any_host=True,
    needs_allowed_host=True,
    spellings=_canonical_url,
)
LOCAL = HubKind(name="local", form="a local directory", parse=_local, fetched=False)

KINDS = KindTable([TFHUB, KAGGLE, HOSTING, LOCAL])
"""Every kind of handle hubd understands; the order is the one error messages list them in."""
