"""Handle parsing: every form the TF Hub ecosystem uses, and clear refusals for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
from hubd_client.handles import check_redirect, kaggle_canonical_from_url, parse_handle

from hubd.errors import BadHandle, DisallowedHost


@pytest.mark.parametrize(
    "handle",
    [
        "https://tfhub.dev/google/nnlm-en-dim128/2",
        "https://tfhub.dev/google/nnlm-en-dim128/2/",
        "tfhub.dev/google/nnlm-en-dim128/2",
        "https://tfhub.dev/google/nnlm-en-dim128/2?tf-hub-format=compressed",
        "HTTPS://TFHUB.DEV/google/nnlm-en-dim128/2",
    ],
)
def test_tfhub_spellings_share_one_canonical_name(handle: str) -> None:
    source = parse_handle(handle)
    assert source.kind == "tfhub"
    assert source.canonical == "tfhub.dev/google/nnlm-en-dim128/2"
    assert source.url == "https://tfhub.dev/google/nnlm-en-dim128/2?tf-hub-format=compressed"
    assert source.mirror_path == "google/nnlm-en-dim128/2"


def test_tfhub_nested_model_names_are_kept() -> None:
    source = parse_handle("https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5")
    assert source.canonical == "tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"


@pytest.mark.parametrize(
    "handle",
    [
        "https://www.kaggle.com/models/google/nnlm/TensorFlow2/en-dim128/2",
        "https://www.kaggle.com/models/google/nnlm/tensorFlow2/en-dim128/2",
        "https://kaggle.com/models/google/nnlm/tensorflow2/en-dim128/2/",
        "https://www.kaggle.com/models/google/nnlm/frameworks/TensorFlow2/variations/en-dim128/versions/2",
        "www.kaggle.com/models/google/nnlm/tensorflow2/en-dim128/2",
    ],
)
def test_kaggle_short_and_long_forms_share_one_canonical_name(handle: str) -> None:
    source = parse_handle(handle)
    assert source.kind == "kaggle"
    assert source.canonical == "kaggle.com/models/google/nnlm/tensorflow2/en-dim128/2"
    assert source.url == (
        "https://www.kaggle.com/models/google/nnlm/frameworks/tensorflow2/variations/en-dim128/versions/2"
        "?tf-hub-format=compressed"
    )


def test_kaggle_twin_is_recognised_in_a_redirect_url() -> None:
    url = "https://www.kaggle.com/models/google/nnlm/frameworks/TensorFlow2/variations/en-dim128/versions/2"
    assert kaggle_canonical_from_url(url + "?tf-hub-format=compressed") == (
        "kaggle.com/models/google/nnlm/tensorflow2/en-dim128/2"
    )
    assert kaggle_canonical_from_url("https://storage.googleapis.com/x/y.tar.gz") is None


def test_kaggle_twins_come_only_from_kaggle_or_the_mirrors_exact_origin() -> None:
    path = "/models/google/nnlm/frameworks/TensorFlow2/variations/en-dim128/versions/2"
    twin = "kaggle.com/models/google/nnlm/tensorflow2/en-dim128/2"
    mirror = "http://mirror.lan:8760"
    assert kaggle_canonical_from_url(mirror + path, mirror) == twin
    assert kaggle_canonical_from_url("http://mirror.lan:8761" + path, mirror) is None  # another port
    assert kaggle_canonical_from_url("https://mirror.lan:8760" + path, mirror) is None  # another scheme
    assert kaggle_canonical_from_url("http://kaggle.com" + path) is None  # Kaggle only over https
    assert kaggle_canonical_from_url("https://www.kaggle.com:8443" + path) is None
    assert kaggle_canonical_from_url(mirror + path) is None  # no mirror configured


def test_other_https_servers_speak_the_hosting_protocol() -> None:
    source = parse_handle("https://models.example.org/team/encoder/3")
    assert source.kind == "url"
    assert source.url == "https://models.example.org/team/encoder/3?tf-hub-format=compressed"
    assert source.mirror_path == ""


def test_plain_http_is_refused_unless_the_host_and_port_are_allowed() -> None:
    with pytest.raises(DisallowedHost, match="plain http"):
        parse_handle("http://127.0.0.1:8080/a/b/1")
    assert parse_handle("http://127.0.0.1:8080/a/b/1", frozenset({"127.0.0.1:8080"})).kind == "url"
    assert parse_handle("http://127.0.0.1/a/b/1", frozenset({"127.0.0.1"})).kind == "url"
    with pytest.raises(DisallowedHost, match="plain http"):  # a host without a port means port 80 only
        parse_handle("http://127.0.0.1:8080/a/b/1", frozenset({"127.0.0.1"}))


@pytest.mark.parametrize(
    "handle",
    [
        "https://user:pw@tfhub.dev/google/nnlm-en-dim128/2",
        "https://token@models.example.org/team/encoder/3",
        "https://tfhub.dev/google/nnlm-en-dim128/2?token=s3cret",
        "https://models.example.org/team/encoder/3?tf-hub-format=compressed&key=s3cret",
        "https://models.example.org/team/encoder/3#s3cret",
    ],
)
def test_handles_carrying_credentials_are_refused(handle: str) -> None:
    with pytest.raises(BadHandle, match=r"credentials|query") as caught:
        parse_handle(handle)
    assert caught.value.hint and "s3cret" not in str(caught.value) and "pw" not in caught.value.message


def test_local_directory_is_returned_as_it_is(tmp_path: Path) -> None:
    source = parse_handle(str(tmp_path))
    assert source.kind == "local"
    assert source.local_path == str(tmp_path.resolve())


@pytest.mark.parametrize(
    ("handle", "message"),
    [
        ("", "empty handle"),
        ("gs://bucket/model", "unsupported scheme"),
        ("ftp://tfhub.dev/a/b/1", "unsupported scheme"),
        ("not-a-handle", "not a model handle"),
        ("https://tfhub.dev/google/nnlm", "numeric version"),
        ("https://tfhub.dev/google/nnlm/latest", "numeric version"),
        ("https://www.kaggle.com/models/google/nnlm", "owner, model, framework"),
        ("https://www.kaggle.com/datasets/a/b", "not a Kaggle model"),
        ("https://tfhub.dev/google/%2e%2e/secret/1", "percent-encoded"),
        ("https://tfhub.dev/google/../secret/1", "invalid path segment"),
        ("/no/such/dir/anywhere", "no such model directory"),
    ],
)
def test_bad_handles_get_an_error_naming_what_is_accepted(handle: str, message: str) -> None:
    with pytest.raises(BadHandle, match=message) as caught:
        parse_handle(handle)
    assert caught.value.hint


def test_redirects_only_to_allowed_hosts() -> None:
    allowed = ["storage.googleapis.com"]
    origin = "https://tfhub.dev/a/b/1"
    check_redirect("https://storage.googleapis.com/a.tar.gz", origin, allowed, frozenset())
    check_redirect("https://tfhub.dev/other", origin, allowed, frozenset())
    with pytest.raises(DisallowedHost, match="not allowed"):
        check_redirect("https://169.254.169.254/latest/meta-data", origin, allowed, frozenset())
    with pytest.raises(DisallowedHost, match="plain http"):
        check_redirect("http://storage.googleapis.com/a.tar.gz", origin, allowed, frozenset())


def test_redirects_are_checked_on_scheme_host_and_port() -> None:
    origin = "http://127.0.0.1:8760/a/b/1"
    http_hosts = frozenset({"127.0.0.1:8760"})
    check_redirect("http://127.0.0.1:8760/models/x", origin, ["127.0.0.1"], http_hosts)  # same origin
    with pytest.raises(DisallowedHost):  # the same host on another port is another server
        check_redirect("http://127.0.0.1:9999/models/x", origin, ["127.0.0.1"], frozenset({"127.0.0.1"}))
    with pytest.raises(DisallowedHost, match="not allowed"):  # an entry without a port means 443
        check_redirect(
            "https://storage.googleapis.com:8443/a", "https://tfhub.dev/a", ["storage.googleapis.com"], http_hosts
        )
    check_redirect("https://store.lan:8443/a", "https://tfhub.dev/a", ["store.lan:8443"], frozenset())


@pytest.mark.parametrize("handle", ["0" * 5000, "~" + "x" * 5000, "./\x00", "/" + "a/" * 3000])
def test_absurd_strings_are_bad_handles_not_crashes(handle: str) -> None:
    with pytest.raises(BadHandle):
        parse_handle(handle)
