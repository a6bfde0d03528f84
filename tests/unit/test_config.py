"""hubd.config: flags over environment over the user's file over the machine's file over embedded defaults,
sizes and URLs validated once, and errors that name the field."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from hubd.config import SYSTEM_CONFIG, Settings, config_files, effective, load_settings, parse_size
from hubd.errors import BadRequest

REPO = Path(__file__).resolve().parents[2]


def test_embedded_defaults_need_no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("HUBD_"):
            monkeypatch.delenv(key)
    settings = load_settings()
    assert settings.cache_dir.name == "hubd" and not settings.offline and settings.mirror is None
    assert "tfhub.dev" in settings.allowed_hosts


def test_toml_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hubd.toml"
    config.write_text('mirror = "http://mirror.lan:8080"\noffline = true\nhttp_hosts = ["mirror.lan"]\n')
    monkeypatch.setenv("HUBD_CONFIG", str(config))
    assert load_settings().mirror == "http://mirror.lan:8080"
    monkeypatch.setenv("HUBD_MIRROR", "https://env.example")
    assert load_settings().mirror == "https://env.example"
    assert load_settings(mirror="https://flag.example").mirror == "https://flag.example"
    assert load_settings().offline is True
    monkeypatch.setenv("HUBD_HTTP_HOSTS", "a.lan, b.lan")
    assert load_settings().http_hosts == ["a.lan", "b.lan"]


def test_invalid_settings_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBD_RETRIES", "many")
    with pytest.raises(BadRequest, match="retries"):
        load_settings()
    monkeypatch.delenv("HUBD_RETRIES")
    config = tmp_path / "hubd.toml"
    config.write_text('mirror = "ftp://nope"\nsurprise = 1\n')
    monkeypatch.setenv("HUBD_CONFIG", str(config))
    with pytest.raises(BadRequest, match="mirror") as caught:
        load_settings()
    assert "surprise" in caught.value.message


def _machine_settings(system: Path) -> type[Settings]:
    """Settings whose machine-wide file is `system` (the real /etc/hubd/hubd.toml is not the tests' to write)."""
    return type("MachineSettings", (Settings,), {"system_config": system})


def _clean_env(monkeypatch: pytest.MonkeyPatch, xdg: Path) -> None:
    for key in list(os.environ):
        if key.startswith("HUBD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))


def test_flags_then_env_then_user_file_then_machine_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch, tmp_path / "xdg")
    system = tmp_path / "etc" / "hubd.toml"
    system.parent.mkdir()
    system.write_text("retries = 1\nmax_fetches = 2\nmax_members = 3\nread_timeout = 4.0\n")
    settings_cls = _machine_settings(system)
    assert settings_cls().retries == 1
    user = tmp_path / "xdg" / "hubd" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("retries = 11\nmax_fetches = 12\nmax_members = 13\n")
    monkeypatch.setenv("HUBD_RETRIES", "21")
    monkeypatch.setenv("HUBD_MAX_FETCHES", "22")
    settings = settings_cls(retries=31)
    assert (settings.retries, settings.max_fetches, settings.max_members, settings.read_timeout) == (31, 22, 13, 4)
    assert settings.connect_timeout == Settings.model_fields["connect_timeout"].default

    flags = {"retries": 31, "mirror": None}
    sources = {row.name: row.source for row in effective(settings, flags)}
    assert sources["retries"] == "flag" and sources["max_fetches"] == "env"
    assert sources["max_members"] == str(user) and sources["read_timeout"] == str(system)
    assert sources["mirror"] == sources["connect_timeout"] == "default"


def test_hubd_config_names_one_file_that_replaces_both_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch, tmp_path / "xdg")
    assert config_files() == [tmp_path / "xdg" / "hubd" / "config.toml", SYSTEM_CONFIG]
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    assert config_files()[0] == Path.home() / ".config" / "hubd" / "config.toml"
    named = tmp_path / "only.toml"
    named.write_text("retries = 7\n")
    monkeypatch.setenv("HUBD_CONFIG", str(named))
    assert config_files() == [named]
    system = tmp_path / "system.toml"
    system.write_text("retries = 1\nmax_fetches = 2\n")
    settings = _machine_settings(system)()
    assert (settings.retries, settings.max_fetches) == (7, Settings.model_fields["max_fetches"].default)


def test_the_example_config_sets_every_setting_validly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd/hubd.toml.example, every line uncommented, is a valid configuration naming every setting."""
    example = (REPO / "systemd" / "hubd.toml.example").read_text()
    setting = re.compile(r"^# ([a-z_]+ = .*|\s{4,}\S.*)$")  # a key, or the continuation of a list
    uncommented = "\n".join(m.group(1) for line in example.splitlines() if (m := setting.match(line)))
    keys = tomllib.loads(uncommented).keys()
    assert set(keys) == set(Settings.model_fields)
    config = tmp_path / "hubd.toml"
    config.write_text(uncommented)
    _clean_env(monkeypatch, tmp_path / "xdg")
    monkeypatch.setenv("HUBD_CONFIG", str(config))
    assert load_settings().max_size == 50 * 2**30


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000", 1000),
        ("512M", 512 * 2**20),
        ("50G", 50 * 2**30),
        ("50GiB", 50 * 2**30),
        ("50gb", 50 * 2**30),
        ("1.5T", int(1.5 * 2**40)),
        (" 2k ", 2048),
        ("7B", 7),
    ],
)
def test_sizes_are_read_in_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "fifty", "5X", "5 G B"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_a_size_in_the_environment_reaches_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBD_MAX_SIZE", "2G")
    assert load_settings().max_size == 2 * 2**30
    monkeypatch.setenv("HUBD_MAX_SIZE", "0")
    with pytest.raises(BadRequest, match="max_size"):  # a quota of nothing is a mistake, not "no quota"
        load_settings()


@pytest.mark.parametrize(
    ("mirror", "kept"),
    [
        ("http://mirror.lan:8760/", "http://mirror.lan:8760"),
        ("https://m.example", "https://m.example"),
        ("", None),
    ],
)
def test_a_mirror_is_an_http_url_without_its_trailing_slash(mirror: str, kept: str | None) -> None:
    assert Settings(mirror=mirror).mirror == kept


@pytest.mark.parametrize("mirror", ["ftp://mirror.lan", "mirror.lan:8760", "file:///srv/models"])
def test_a_mirror_that_is_not_http_is_refused(mirror: str) -> None:
    with pytest.raises(BadRequest, match="mirror"):
        load_settings(mirror=mirror)


@pytest.mark.parametrize("store", ["s3://", "s3:///prefix", "gs://bucket/prefix", "bucket/prefix"])
def test_an_object_store_must_name_an_s3_bucket(store: str) -> None:
    with pytest.raises(BadRequest, match="object_store"):
        load_settings(object_store=store)
    assert Settings(object_store="s3://bucket/prefix/").object_store == "s3://bucket/prefix"


def test_lists_come_comma_separated_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HUBD_ALLOWED_HOSTS", "a.example, *.b.example,,")
    monkeypatch.setenv("HUBD_MANIFESTS", f"{tmp_path}/one.toml,{tmp_path}/two.toml")
    settings = load_settings()
    assert settings.allowed_hosts == ["a.example", "*.b.example"]
    assert settings.manifests == [tmp_path / "one.toml", tmp_path / "two.toml"]


def test_an_unknown_key_in_a_file_is_an_error_not_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt setting silently ignored is a setting the admin thinks is in force."""
    config = tmp_path / "hubd.toml"
    config.write_text("max_sise = 5\n")
    monkeypatch.setenv("HUBD_CONFIG", str(config))
    with pytest.raises(BadRequest, match="max_sise"):
        load_settings()


def test_a_file_that_is_not_toml_is_a_readable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hubd.toml"
    config.write_text("retries = [\n")
    monkeypatch.setenv("HUBD_CONFIG", str(config))
    with pytest.raises(BadRequest, match=re.escape(str(config))):
        load_settings()
