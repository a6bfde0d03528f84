"""hubd_client.kinds: each hub kind is one row (parse, canonical name, tensorflow_hub spellings, mirror path, twin
rule), and a new hub is one more row that the handle parser, the mirror and the twin rule pick up unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hubd_client.handles import (
    ACCEPTED_FORMS,
    AnyHost,
    handle_from_mirror_path,
    is_local,
    parse_handle,
    twin_name,
)
from hubd_client.kinds import HOSTING, KAGGLE, KINDS, LOCAL, TFHUB, HubKind, KindTable, Location, Source

from hubd.errors import BadHandle
from hubd.tfhub_view import spellings

KAGGLE_LONG = "https://www.kaggle.com/models/google/nnlm/frameworks/TensorFlow2/variations/en-dim128/versions/2"
KAGGLE_NAME = "kaggle.com/models/google/nnlm/tensorflow2/en-dim128/2"


@dataclass(frozen=True)
class Row:
    """What one kind's row must produce for one handle."""

    handle: str
    kind: HubKind
    canonical: str
    url: str
    mirror_path: str
    spellings: set[str]
    twin: str | None


ROWS = [
    Row(
        "tfhub.dev/google/nnlm-en-dim128/2/",
        TFHUB,
        "tfhub.dev/google/nnlm-en-dim128/2",
        "https://tfhub.dev/google/nnlm-en-dim128/2?tf-hub-format=compressed",
        "google/nnlm-en-dim128/2",
        {"https://tfhub.dev/google/nnlm-en-dim128/2"},
        "kaggle",
    ),
    Row(
        KAGGLE_LONG,
        KAGGLE,
        KAGGLE_NAME,
        "https://www.kaggle.com/models/google/nnlm/frameworks/tensorflow2/variations/en-dim128/versions/2"
        "?tf-hub-format=compressed",
        "models/google/nnlm/tensorflow2/en-dim128/2",
        {
            "https://" + KAGGLE_NAME,
            "https://www.kaggle.com/models/google/nnlm/TensorFlow2/en-dim128/2",
            "https://www.kaggle.com/models/google/nnlm/frameworks/tensorFlow2/variations/en-dim128/versions/2",
        },
        None,
    ),
    Row(
        "https://models.example.org:8443/team/encoder/3",
        HOSTING,
        "models.example.org:8443/team/encoder/3",
        "https://models.example.org:8443/team/encoder/3?tf-hub-format=compressed",
        "",
        {"https://models.example.org:8443/team/encoder/3"},
        None,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.kind.name)
def test_each_remote_kind_parses_to_its_canonical_name_url_and_mirror_path(row: Row) -> None:
    source = parse_handle(row.handle)
    assert KINDS[source.kind] is row.kind
    assert (source.canonical, source.url, source.mirror_path) == (row.canonical, row.url, row.mirror_path)
    assert source.handle == row.handle
    assert row.kind.fetched


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.kind.name)
def test_each_kind_names_the_spellings_tensorflow_hub_users_write(row: Row) -> None:
    source = parse_handle(row.handle)
    assert row.spellings <= row.kind.spellings(source)
    for spelling in row.kind.spellings(source):
        assert parse_handle(spelling).canonical == row.canonical  # every spelling names the same model
    view = spellings(row.handle)
    assert {row.handle, *row.spellings} <= view
    assert {f"{name}/" for name in row.spellings} <= view  # tensorflow_hub keys on the string as written


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.kind.name)
def test_each_kind_says_which_twin_a_redirect_may_reveal(row: Row) -> None:
    assert row.kind.twin == row.twin
    source = parse_handle(row.handle)
    redirects = [source.url, KAGGLE_LONG + "?tf-hub-format=compressed", "https://storage.googleapis.com/m.tar.gz"]
    assert twin_name(source, redirects) == (KAGGLE_NAME if row.twin == "kaggle" else None)


def test_a_twin_comes_only_from_a_hop_after_the_first_and_is_never_the_handle_itself() -> None:
    tfhub = parse_handle("https://tfhub.dev/google/nnlm-en-dim128/2")
    assert twin_name(tfhub, [KAGGLE_LONG]) is None  # the download URL itself names no twin
    assert twin_name(tfhub, [tfhub.url, "https://tfhub.dev/google/other/1"]) is None
    kaggle = parse_handle(KAGGLE_LONG)
    assert twin_name(kaggle, [kaggle.url, KAGGLE_LONG]) is None  # Kaggle has no twin rule


def test_a_twin_is_recorded_under_a_handle_of_its_own_kind_that_parses_back_to_it() -> None:
    handle = KINDS.for_canonical(KAGGLE_NAME).handle_for(KAGGLE_NAME)
    assert handle == "https://www.kaggle.com/models/google/nnlm/tensorflow2/en-dim128/2"
    assert parse_handle(handle).canonical == KAGGLE_NAME
    assert KINDS.for_canonical("models.example.org:8443/a/b/1").handle_for("models.example.org:8443/a/b/1") == (
        "https://models.example.org:8443/a/b/1"
    )


@pytest.mark.parametrize("row", [r for r in ROWS if r.mirror_path], ids=lambda row: row.kind.name)
def test_a_mirror_path_leads_back_to_the_same_model(row: Row) -> None:
    source = parse_handle(row.handle)
    assert parse_handle(handle_from_mirror_path(source.mirror_path)).canonical == row.canonical
    mirror = "http://mirror.lan:8760"
    assert source.download_url(mirror) == f"{mirror}/{row.mirror_path}?tf-hub-format=compressed"


def test_a_hosting_protocol_server_is_never_mirrored_and_must_be_allowed() -> None:
    source = parse_handle(ROWS[2].handle)
    assert HOSTING.mirror_prefix is None and source.download_url("http://mirror.lan:8760") == source.url
    assert HOSTING.needs_allowed_host and HOSTING.any_host
    assert not TFHUB.needs_allowed_host and not KAGGLE.needs_allowed_host  # their hosts are allowed by default


def test_a_local_directory_is_used_in_place(tmp_path: Path) -> None:
    source = parse_handle(str(tmp_path))
    assert KINDS[source.kind] is LOCAL and not LOCAL.fetched
    assert source.canonical == source.local_path == str(tmp_path.resolve())
    assert (source.url, source.mirror_path) == ("", "")
    assert LOCAL.spellings(source) == frozenset()  # never linked in tfhub_modules/
    assert LOCAL.twin is None and LOCAL.mirror_prefix is None


def test_the_accepted_forms_list_every_row_in_order() -> None:
    assert ACCEPTED_FORMS == (
        "https://tfhub.dev/<publisher>/<model>/<version>, "
        "https://www.kaggle.com/models/<owner>/<model>/<framework>/<variation>/<version>, "
        "any https:// URL of a TF Hub hosting-protocol server, or a local directory"
    )
    assert [row.name for row in KINDS] == ["tfhub", "kaggle", "url", "local"]


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([TFHUB, TFHUB, HOSTING, LOCAL], "share a name"),
        ([TFHUB, HubKind("tfhub2", "x", TFHUB.parse, hosts=frozenset({"tfhub.dev"})), HOSTING, LOCAL], "one host"),
        ([TFHUB, KAGGLE, LOCAL], "any-host row"),
        ([TFHUB, KAGGLE, HOSTING], "local row"),
        ([TFHUB, HOSTING, LOCAL], "unknown twin"),
    ],
)
def test_an_ambiguous_table_is_refused_when_built(rows: list[HubKind], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        KindTable(rows)


# -- a new hub is one row --------------------------------------------------------------------------------------


def _example(where: Location) -> Source:
    if len(where.segments) != 4 or where.segments[0] != "m" or not where.segments[-1].isdigit():
        raise BadHandle(f"not an example.hub model: {where.handle!r}", "for example https://example.hub/m/a/b/1")
    return Source("example", where.handle, "example.hub/" + "/".join(where.segments), f"https://{where.netloc}/x")


EXAMPLE = HubKind(
    name="example",
    form="https://example.hub/m/<org>/<model>/<version>",
    parse=_example,
    hosts=frozenset({"example.hub"}),
    spellings=lambda source: frozenset({f"https://{source.canonical}", f"https://www.{source.canonical}"}),
    mirror_prefix="m",
    home="https://example.hub",
    twin="kaggle",
)
WITH_EXAMPLE = KindTable([TFHUB, KAGGLE, EXAMPLE, HOSTING, LOCAL])


def test_a_new_kind_is_one_row_that_the_parser_mirror_and_twin_rule_use() -> None:
    source = parse_handle("example.hub/m/org/model/7/", kinds=WITH_EXAMPLE)  # scheme-less: a hub host
    assert (source.kind, source.canonical, source.mirror_path) == (
        "example",
        "example.hub/m/org/model/7",
        "m/org/model/7",
    )
    assert not is_local("example.hub/m/org/model/7", WITH_EXAMPLE)
    assert "https://example.hub/m/<org>/<model>/<version>" in WITH_EXAMPLE.accepted_forms
    assert handle_from_mirror_path("m/org/model/7", WITH_EXAMPLE) == "https://example.hub/m/org/model/7"
    assert handle_from_mirror_path("models/a/b/c/d/1", WITH_EXAMPLE).startswith("https://www.kaggle.com/")
    assert twin_name(source, [source.url, KAGGLE_LONG], kinds=WITH_EXAMPLE) == KAGGLE_NAME
    assert "https://www.example.hub/m/org/model/7" in WITH_EXAMPLE["example"].spellings(source)
    with pytest.raises(BadHandle, match="not an example"):
        parse_handle("https://example.hub/other", kinds=WITH_EXAMPLE)


def test_a_new_kind_changes_nothing_for_the_others() -> None:
    for handle in (ROWS[0].handle, KAGGLE_LONG, ROWS[2].handle):
        assert parse_handle(handle, kinds=WITH_EXAMPLE) == parse_handle(handle)
    assert parse_handle("https://example.hub/m/org/model/7", AnyHost()).kind == "url"  # not in the real table
