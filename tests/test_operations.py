"""Running hubd for a machine: systemd units, a cache shared by users, quotas and pins, status,
the tensorflow_hub cache view, and one hubd feeding another."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hubd.eviction
from hubd.config import Settings
from hubd.engine import Engine
from hubd.errors import CollectorBusy
from hubd.eviction import collect, gc_lock
from tests.conftest import REPO, Upstream, cli_env
from tests.daemon import Daemon, start_daemon
from tests.test_engine import resolve, with_engine

SYSTEM_PYTHON = Path("/usr/bin/python3")


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


# -- systemd -------------------------------------------------------------------------------------------


def _user_scripts(home: Path) -> Path:
    """Where `pip install --user` puts console scripts for a user whose home is `home`."""
    code = "import sysconfig; print(sysconfig.get_path('scripts', 'posix_user'))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUSERBASE"} | {"HOME": str(home)}
    return Path(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()
    )


def _verify_units(tmp_path: Path, folder: Path, user: bool) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify (it checks that ExecStart exists). The system units' ExecStart is pointed at this
    environment's hubd; the user units are verified as shipped, for a user whose `pip install --user` put hubd
    where pip puts scripts (linked here to this environment's hubd)."""
    hubd = Path(sys.executable).parent / "hubd"
    out = tmp_path / ("user" if user else "system")
    out.mkdir()
    home = tmp_path / "home"
    for unit in ("hubd.service", "hubd.socket"):
        text = (folder / unit).read_text()
        (out / unit).write_text(text if user else text.replace("/usr/local/bin/hubd", str(hubd)))
    if user:
        _user_scripts(home).mkdir(parents=True)
        (_user_scripts(home) / "hubd").symlink_to(hubd)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    cmd = [
        "systemd-analyze",
        *(["--user"] if user else []),
        "verify",
        str(out / "hubd.socket"),
        str(out / "hubd.service"),
    ]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "warning", "HOME": str(home)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is installed by .ci/run")
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_systemd_units_verify_cleanly(tmp_path: Path, user: bool) -> None:
    folder = REPO / "systemd" / ("user" if user else "")
    result = _verify_units(tmp_path, folder, user)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_user_unit_runs_the_hubd_that_pip_install_user_installs(tmp_path: Path) -> None:
    service = (REPO / "systemd" / "user" / "hubd.service").read_text().splitlines()
    assert "ExecStart=%h/.local/bin/hubd serve" in service
    assert _user_scripts(tmp_path) == tmp_path / ".local" / "bin"


@pytest.mark.parametrize("unit", ["hubd.service", "hubd.socket", "user/hubd.service", "user/hubd.socket"])
def test_units_document_themselves_with_urls_or_the_installed_readme(unit: str) -> None:
    """Documentation= names a URL, or the README that the README's install steps put under share/doc/hubd/."""
    lines = (REPO / "systemd" / unit).read_text().splitlines()
    docs = [d for line in lines if line.startswith("Documentation=") for d in line.split("=", 1)[1].split()]
    assert docs
    for doc in docs:
        if doc.startswith("file:"):
            home = "%h/.local" if unit.startswith("user/") else "/usr"
            assert doc == f"file://{home}/share/doc/hubd/README.md", doc
        else:
            assert doc.startswith(("https://", "http://", "man:", "info:")), doc


def test_system_unit_is_hardened_and_socket_is_group_only() -> None:
    service = (REPO / "systemd" / "hubd.service").read_text()
    for directive in (
        "Type=notify",
        "User=hubd",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/cache/hubd",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ):
        assert directive in service.splitlines(), directive
    socket_unit = (REPO / "systemd" / "hubd.socket").read_text().splitlines()
    assert "SocketMode=0660" in socket_unit and "SocketGroup=hubd-users" in socket_unit
    assert "u     hubd" in (REPO / "systemd" / "hubd.sysusers.conf").read_text()
    assert "/var/cache/hubd     0755 hubd hubd" in (REPO / "systemd" / "hubd.tmpfiles.conf").read_text()


# -- a cache shared by several users ------------------------------------------------------------------------

TAMPER = """
import os, sys
tree = sys.argv[1]
target = os.path.join(tree, "saved_model.pb")
open(target, "rb").read()  # reading is fine
attempts = {
    "append": lambda: open(target, "ab").write(b"x"),
    "unlink": lambda: os.unlink(target),
    "create": lambda: open(os.path.join(tree, "evil"), "wb"),
    "chmod": lambda: os.chmod(target, 0o666),
    "rename": lambda: os.rename(target, target + ".old"),
    "staging": lambda: os.listdir(sys.argv[2]),
}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "ALLOWED")
    except PermissionError:
        print(name, "denied")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root to act as another uid")
def test_another_user_cannot_change_a_published_model(settings: Settings, upstream: Upstream) -> None:
    public = Path(tempfile.mkdtemp(prefix="hubd-shared-"))
    public.chmod(0o755)
    try:
        shared = settings.model_copy(update={"cache_dir": public / "cache"})
        entry = resolve(shared, tfhub(upstream.publish("reusable")))
        result = subprocess.run(
            [str(SYSTEM_PYTHON), "-c", TAMPER, entry.path, str(shared.cache_dir / "staging")],
            user="nobody",
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.split() == [
            "append",
            "denied",
            "unlink",
            "denied",
            "create",
            "denied",
            "chmod",
            "denied",
            "rename",
            "denied",
            "staging",
            "denied",
        ]
    finally:
        shutil.rmtree(public, ignore_errors=True)


# -- eviction and pins -------------------------------------------------------------------------------------


@pytest.fixture
def quota_settings(settings: Settings, models: dict[str, bytes]) -> Settings:
    return settings.model_copy(update={"gc_grace": 0.0})


def sizes(settings: Settings, upstream: Upstream, names: list[str]) -> dict[str, int]:
    return {n: resolve(settings, tfhub(upstream.publish(n))).size_bytes for n in names}


def test_quota_evicts_the_least_recently_used_first(quota_settings: Settings, upstream: Upstream) -> None:
    a, b, c = (tfhub(upstream.publish(n)) for n in ("reusable", "text_embedding", "signature_only"))
    first = resolve(quota_settings, a)
    second = resolve(quota_settings, b)
    resolve(quota_settings, a)  # a is now used more recently than b
    limit = first.size_bytes + second.size_bytes  # room for two: the third must push one out
    third = resolve(quota_settings.model_copy(update={"max_size": limit}), c)
    assert Path(first.path).is_dir() and Path(third.path).is_dir()
    assert not Path(second.path).exists()


def test_room_is_made_only_once_the_model_is_published(
    quota_settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    first = resolve(quota_settings, tfhub(upstream.publish("reusable")))
    second = resolve(quota_settings, tfhub(upstream.publish("text_embedding")))
    big = upstream.publish("large_4mb")
    unpacked = resolve(
        quota_settings.model_copy(update={"cache_dir": tmp_path / "scratch"}), tfhub(big)
    ).size_bytes
    quota = first.size_bytes + second.size_bytes + unpacked - 1  # the new model fits once one of them goes
    present: list[tuple[int, bool, bool]] = []

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase == "download" and done > 0:
            present.append((done, Path(first.path).exists(), Path(second.path).exists()))

    async def body(engine: Engine) -> None:
        await engine.resolve(tfhub(big), on_progress=progress)

    with_engine(quota_settings.model_copy(update={"max_size": quota}), body)
    # Nothing went while the bytes arrived (they could still have failed a check): both stayed until the new
    # model had passed every check and was published; then the least recently used went, just enough for it.
    assert present[0][1:] == (True, True) and present[0][0] < len(upstream.models["large_4mb"])
    assert present[-1] == (len(upstream.models["large_4mb"]), True, True)
    assert not Path(first.path).exists() and Path(second.path).exists()


def test_a_fetch_into_a_cache_under_its_quota_reads_no_other_entry(
    quota_settings: Settings, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100,000 entries reading every meta and ref took ~10 s per fetch under a quota (1 s at 10,000); the
    index's totals row answers "does it fit?" when nothing needs evicting, and only an eviction gathers."""
    first = resolve(quota_settings, tfhub(upstream.publish("reusable")))
    gathered: list[str] = []
    real_gather = hubd.eviction.gather

    def counting_gather(*args: Any, **kwargs: Any) -> Any:
        gathered.append("gather")
        return real_gather(*args, **kwargs)

    monkeypatch.setattr(hubd.eviction, "gather", counting_gather)
    second = resolve(
        quota_settings.model_copy(update={"max_size": 10 * first.size_bytes}),
        tfhub(upstream.publish("text_embedding")),
    )
    assert gathered == [] and Path(first.path).is_dir() and Path(second.path).is_dir()
    third = resolve(
        quota_settings.model_copy(update={"max_size": first.size_bytes + second.size_bytes}),
        tfhub(upstream.publish("signature_only")),
    )
    assert gathered  # over the quota: the files were read and the least recently used went
    assert not Path(first.path).exists() and Path(second.path).is_dir() and Path(third.path).is_dir()


def test_pinned_entries_are_never_evicted(quota_settings: Settings, upstream: Upstream) -> None:
    a, b = (tfhub(upstream.publish(n)) for n in ("reusable", "text_embedding"))
    first, second = resolve(quota_settings, a), resolve(quota_settings, b)

    async def pin_and_collect(engine: Engine) -> list[str]:
        engine.pin(first.id, "course")
        engine.pin(second.id, "course")
        report = await asyncio.to_thread(collect, engine, 1)  # a 1-byte quota
        return [e.id for e in report.removed]

    assert with_engine(quota_settings, pin_and_collect) == []
    assert Path(first.path).is_dir() and Path(second.path).is_dir()


def test_recently_used_entries_are_kept_within_the_grace_period(settings: Settings, upstream: Upstream) -> None:
    entry = resolve(settings, tfhub(upstream.publish("reusable")))
    report = with_engine(settings, lambda engine: asyncio.to_thread(collect, engine, 1))
    assert report.removed == [] and report.kept_recent == 1
    assert Path(entry.path).is_dir()


def test_gc_waits_for_a_publish_in_progress(quota_settings: Settings, upstream: Upstream) -> None:
    resolve(quota_settings, tfhub(upstream.publish("reusable")))

    async def body(engine: Engine) -> None:
        with gc_lock(engine.store, shared=True), pytest.raises(CollectorBusy):  # held while publishing
            collect(engine, 1, wait=False)
        assert len(collect(engine, 1, wait=False).removed) == 1

    with_engine(quota_settings, body)


def test_hubd_gc_dry_run_then_for_real(quota_settings: Settings, upstream: Upstream) -> None:
    entry = resolve(quota_settings, tfhub(upstream.publish("reusable")))
    env = {**cli_env(quota_settings), "HUBD_GC_GRACE": "0"}
    dry = subprocess.run(
        [sys.executable, "-m", "hubd", "gc", "--max-size", "1", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"would remove {entry.id[:12]}" in dry.stdout and Path(entry.path).is_dir()
    real = subprocess.run(
        [sys.executable, "-m", "hubd", "gc", "--max-size", "1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"removed {entry.id[:12]}" in real.stdout and "freed" in real.stdout
    assert not Path(entry.path).exists()


def test_gc_drops_quarantined_trees_and_orphans(quota_settings: Settings, upstream: Upstream) -> None:
    entry = resolve(quota_settings, tfhub(upstream.publish("reusable")))
    Path(entry.path).chmod(0o755)
    Path(entry.path, "saved_model.pb").chmod(0o644)
    Path(entry.path, "saved_model.pb").write_bytes(b"tampered")
    with_engine(quota_settings.model_copy(update={"offline": True}), lambda engine: engine.verify())
    assert list((quota_settings.cache_dir / "quarantine").iterdir())
    report = with_engine(quota_settings, lambda engine: engine.gc())
    assert report.quarantine_freed_bytes > 0
    assert list((quota_settings.cache_dir / "quarantine").iterdir()) == []


# -- status ----------------------------------------------------------------------------------------------


def test_status_reports_size_entries_and_upstream(settings: Settings, upstream: Upstream) -> None:
    resolve(settings, tfhub(upstream.publish("reusable")))
    out = subprocess.run(
        [sys.executable, "-m", "hubd", "status"], env=cli_env(settings), capture_output=True, text=True, check=True
    ).stdout
    assert "entries   1 ok, 0 pinned, 0 broken" in out
    assert f"upstream  {upstream.server.url}: reachable" in out
    dead = {**cli_env(settings), "HUBD_MIRROR": "http://127.0.0.1:9"}
    out = subprocess.run(
        [sys.executable, "-m", "hubd", "status"], env=dead, capture_output=True, text=True, check=True
    ).stdout
    assert "UNREACHABLE" in out


# -- tensorflow_hub cache view ------------------------------------------------------------------------------

TFHUB_OFFLINE = """
import sys, tensorflow as tf, tensorflow_hub as hub
for handle in sys.argv[1:]:
    print(hub.resolve(handle))
print(hub.load(sys.argv[1])(tf.ones([1, 4])).numpy().tolist())
"""


@pytest.mark.slow
def test_unmodified_tensorflow_hub_loads_from_the_view_offline(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    view = settings.cache_dir / "tfhub_modules"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HUBD_")},
        "TFHUB_CACHE_DIR": str(view),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "HTTPS_PROXY": "http://127.0.0.1:9",  # any attempt to reach tfhub.dev fails at once
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    handles = [tfhub(path), tfhub(path) + "/", f"tfhub.dev/{path}".join(["https://", ""])]
    result = subprocess.run(
        [sys.executable, "-c", TFHUB_OFFLINE, *handles], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert all(Path(line).resolve() == Path(entry.path) for line in lines[:3])
    assert lines[3] == "[[2.0, 2.0, 2.0]]"


def test_view_drops_links_to_broken_and_removed_entries(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    view = settings.cache_dir / "tfhub_modules"
    assert any(link.is_symlink() for link in view.iterdir())
    with_engine(settings, lambda engine: asyncio.to_thread(engine.remove, tfhub(path)))
    assert not any(link.is_symlink() for link in view.iterdir())
    assert not Path(entry.path).exists()


# -- one hubd feeding others ---------------------------------------------------------------------------------


@pytest.fixture
def chained(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Daemon, Daemon]]:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    key = tmp_path / "mirror.key"  # shared by both: over plain http the mirror's word on a sha256 is signed
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    keyed = {"HUBD_MIRROR_KEY_FILE": str(key)}
    first = start_daemon(
        settings.model_copy(update={"cache_dir": first_dir / "cache"}),
        first_dir,
        "--mirror-listen",
        "127.0.0.1:0",
        env_extra=keyed,
    )
    second_settings = settings.model_copy(update={"cache_dir": second_dir / "cache", "mirror": first.mirrors[0]})
    second = start_daemon(second_settings, second_dir, env_extra=keyed)
    yield second_settings, first, second
    second.stop()
    first.stop()


def test_chained_daemons_fetch_upstream_once(chained: tuple[Settings, Daemon, Daemon], upstream: Upstream) -> None:
    _settings, first, second = chained
    path = upstream.publish("large_4mb")

    def ask(_: int) -> Any:
        return second.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        entries = list(pool.map(ask, range(8)))
    assert all("path" in e for e in entries), (entries, second.log(), first.log())
    assert len({e["path"] for e in entries}) == 1
    assert upstream.bytes_sent(path) == len(upstream.models["large_4mb"])  # one archive, for 8 clients
    direct = first.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()
    assert direct["tree_digest"] == entries[0]["tree_digest"]  # the same files, re-packed on the way
    original = upstream.server.sha256(path)
    pinned = second.request("POST", "/v1/resolve", {"handle": tfhub(path), "sha256": original})
    assert pinned.status == 200 and pinned.json()["archive_sha256"] == original  # a manifest's sha256 still holds
    fresh = upstream.publish("text_embedding")
    checked = second.request(
        "POST", "/v1/resolve", {"handle": tfhub(fresh), "sha256": upstream.server.sha256(fresh)}
    )
    assert checked.status == 200, checked.body
    wrong = second.request(
        "POST", "/v1/resolve", {"handle": tfhub(upstream.publish("signature_only")), "sha256": "0" * 64}
    )
    assert wrong.status == 409
    kaggle = upstream.publish("reusable", path="models/acme/net/tensorflow2/small/2")
    assert kaggle
    got = second.request(
        "POST", "/v1/resolve", {"handle": "https://www.kaggle.com/models/acme/net/TensorFlow2/small/2"}
    )
    assert got.status == 200, got.body


def test_mirror_answers_404_for_unknown_models(chained: tuple[Settings, Daemon, Daemon]) -> None:
    _settings, first, _second = chained
    import http.client

    host, port = first.mirrors[0].removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/nobody/nothing/1?tf-hub-format=compressed")
        assert conn.getresponse().status == 404
    finally:
        conn.close()


def test_max_size_parses_human_units() -> None:
    from hubd.config import parse_size

    assert parse_size("50G") == 50 * 2**30 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
