"""hubd_client.handles, beside tests/test_handles.py (the accepted forms and refusals): the rules that keep the
daemon from being steered to other servers, and the names that must stay stable because the cache is keyed by
them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hubd_client.handles import http_allowed, is_local, origin, parse_handle

from hubd.errors import BadHandle, DisallowedHost


def test_the_ref_key_of_a_canonical_name_never_changes() -> None:
    """Refs and locks on disk are named by it: a change would orphan every cached entry."""
    source = parse_handle("https://tfhub.dev/google/nnlm-en-dim128/2")
    assert source.ref_key == hashlib.sha256(b"tfhub.dev/google/nnlm-en-dim128/2").hexdigest()[:32]
    assert parse_handle("tfhub.dev/google/nnlm-en-dim128/2/").ref_key == source.ref_key


def test_hub_handles_are_fetched_from_a_configured_mirror_others_are_not() -> None:
    mirror = "http://mirror.lan:8760"
    tfhub = parse_handle("https://tfhub.dev/google/nnlm-en-dim128/2")
    assert tfhub.download_url(mirror) == f"{mirror}/google/nnlm-en-dim128/2?tf-hub-format=compressed"
    assert tfhub.download_url(None) == tfhub.url
    other = parse_handle("https://models.example.org/team/encoder/3")
    assert other.download_url(mirror) == other.url  # a third-party server is never swapped for the mirror


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://Example.ORG/x", ("https", "example.org", 443)),
        ("http://example.org/x", ("http", "example.org", 80)),
        ("http://127.0.0.1:8760/x", ("http", "127.0.0.1", 8760)),
        ("https://[::1]:8443/x", ("https", "::1", 8443)),
    ],
)
def test_servers_are_compared_as_origins_with_the_port_made_explicit(
    url: str, expected: tuple[str, str, int]
) -> None:
    assert origin(url) == expected


@pytest.mark.parametrize("url", ["ftp://example.org/x", "https:///no-host", "https://example.org:99999/x", "x"])
def test_an_unusable_upstream_url_is_a_disallowed_host(url: str) -> None:
    with pytest.raises(DisallowedHost):
        origin(url)


@pytest.mark.parametrize(
    ("host", "port", "entries", "allowed"),
    [
        ("mirror.lan", 80, {"mirror.lan"}, True),
        ("mirror.lan", 8080, {"mirror.lan"}, False),  # an unprivileged user can listen on 8080, not on 80
        ("mirror.lan", 8080, {"mirror.lan:8080"}, True),
        ("::1", 8080, {"[::1]:8080"}, True),
        ("::1", 8081, {"[::1]:8080"}, False),
        ("other.lan", 80, {"mirror.lan"}, False),
        ("mirror.lan", 80, {"mirror.lan:http"}, False),  # a port that is not a number matches nothing
    ],
)
def test_plain_http_needs_the_exact_host_and_port(host: str, port: int, entries: set[str], allowed: bool) -> None:
    assert http_allowed(host, port, frozenset(entries)) is allowed


def test_a_directory_named_like_a_hub_is_still_a_hub_handle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may create ./tfhub.dev/... in a shared directory: it must not stand in for the real model."""
    (tmp_path / "tfhub.dev" / "google" / "model" / "1").mkdir(parents=True)
    (tmp_path / "mymodel").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not is_local("tfhub.dev/google/model/1")
    assert parse_handle("tfhub.dev/google/model/1").kind == "tfhub"
    assert is_local("mymodel") and parse_handle("mymodel").kind == "local"
    assert not is_local("nothing-here")


@pytest.mark.parametrize("prefix", ["/", "./", "../", "~", "file://"])
def test_paths_are_local_by_their_prefix_alone(prefix: str) -> None:
    assert is_local(prefix + "anything")


def test_a_local_handle_is_resolved_to_its_real_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert parse_handle(str(tmp_path / "alias")).local_path == str((tmp_path / "real").resolve())


def test_a_local_handle_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"g")
    with pytest.raises(BadHandle):
        parse_handle(str(tmp_path / "saved_model.pb"))
