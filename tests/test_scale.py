"""Large caches (#15 item 3): paginated listing and status, and the cache watcher within a bounded number of
inotify watches, falling back to the periodic scrub with one log line. Real daemons on caches written to disk
the way publishes leave them (no downloads), and on models fetched from the hosting server."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hubd_client.handles import AnyHost, parse_handle

from hubd.config import Settings
from hubd.layout import open_cache
from hubd.store import ObjectMeta, Ref, Store
from hubd.tree import FileRecord, TreeListing
from tests.conftest import Upstream, cli_env
from tests.daemon import Daemon, start_daemon
from tests.test_metrics import scrape

ENTRIES = 1005
"""More than one page of the CLI's (1000), so `hubd ls` has to follow a cursor."""
USERS = {1000: range(0, 600), 1001: range(0, 10), 1002: range(500, 1005)}
"""uid -> the entries it asked for."""


def write_entries(root: Path, count: int, users: dict[int, range] | None = None, size: int = 64) -> list[str]:
    """A cache of `count` small entries written as publishes leave them (object, meta, ref; users when given),
    with no index: the daemon builds it at start. Returns the digests in the order written."""
    store = Store(root, fsync=False)
    open_cache(store)
    digests = []
    for i in range(count):
        payload = f"model {i}".encode().ljust(size, b".")
        listing = TreeListing(files={"saved_model.pb": FileRecord(size, hashlib.sha256(payload).hexdigest())})
        digest = listing.digest()
        tree = store.objects / digest
        tree.mkdir()
        (tree / "saved_model.pb").write_bytes(payload)
        tree.chmod(0o555)
        source = parse_handle(f"https://tfhub.dev/scale/model-{i}/1", AnyHost())
        store.write_meta(ObjectMeta(digest, f"{i:064x}", size, 1_700_000_000.0 + i, listing, [source.canonical]))
        store.write_ref(source.ref_key, Ref(source.canonical, source.handle, digest, f"{i:064x}", 1_700_000_000.0))
        digests.append(digest)
    if users:
        (root / "users").mkdir(mode=0o700, exist_ok=True)
        for i, digest in enumerate(digests):
            uids = sorted(uid for uid, asked in users.items() if i in asked)
            if uids:
                (root / "users" / f"{digest}.json").write_text(json.dumps({"uids": uids}))
    return digests


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Settings, list[str]]]:
    workdir = tmp_path_factory.mktemp("large")
    settings = Settings(cache_dir=workdir / "cache", offline=True, fsync=False)
    digests = write_entries(settings.cache_dir, ENTRIES, USERS)
    daemon = start_daemon(settings, workdir, env_extra={"HUBD_OFFLINE": "1", "HUBD_TFHUB_VIEW": "0"})
    try:
        yield daemon, settings, digests
    finally:
        daemon.stop()


def test_models_are_listed_a_page_at_a_time_in_id_order(large: tuple[Daemon, Settings, list[str]]) -> None:
    daemon, _settings, digests = large
    seen: list[str] = []
    cursor = ""
    pages = 0
    while True:
        reply = daemon.request("GET", f"/v1/models?limit=400{f'&cursor={cursor}' if cursor else ''}")
        assert reply.status == 200, reply.body
        page = reply.json()
        assert len(page["models"]) <= 400
        seen += [model["id"] for model in page["models"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert cursor == seen[-1]
    assert pages == 3
    assert seen == sorted(digests)


def test_a_page_carries_what_the_whole_listing_did(large: tuple[Daemon, Settings, list[str]]) -> None:
    daemon, settings, digests = large
    first = sorted(digests)[0]
    model = daemon.request("GET", "/v1/models?limit=1").json()["models"][0]
    i = digests.index(first)
    assert model["id"] == first
    assert model["handles"] == [f"tfhub.dev/scale/model-{i}/1"]
    assert model["size_bytes"] == 64 and model["state"] == "ok"
    assert model["path"] == str(settings.cache_dir / "objects" / first)
    assert model["users"] == sorted(uid for uid, asked in USERS.items() if i in asked)


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=10001", "limit=ten", "cursor=../../etc", "cursor=" + "A" * 64, "cursor=12"]
)
def test_a_bad_page_request_is_a_400_naming_the_remedy(
    large: tuple[Daemon, Settings, list[str]], query: str
) -> None:
    reply = large[0].request("GET", f"/v1/models?{query}")
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "bad_request" and reply.json()["error"]["hint"]


def test_a_name_is_looked_up_not_listed(large: tuple[Daemon, Settings, list[str]]) -> None:
    daemon, _settings, digests = large

    def named(name: str) -> list[str]:
        reply = daemon.request("GET", "/v1/models?" + urlencode({"name": name}))
        assert reply.status == 200, reply.body
        assert reply.json()["next_cursor"] is None
        return [model["id"] for model in reply.json()["models"]]

    assert named("https://tfhub.dev/scale/model-7/1") == [digests[7]]
    assert named(digests[8][:12]) == [digests[8]]
    assert named(digests[9]) == [digests[9]]
    assert named("https://tfhub.dev/scale/not-cached/1") == []
    for bad in ("", "x" * 3000, "https://user:secret@tfhub.dev/a/b/1"):
        reply = daemon.request("GET", "/v1/models?" + urlencode({"name": bad}))
        assert reply.status == 400, (bad, reply.body)
        assert reply.json()["error"]["hint"]


def test_hubd_rm_of_a_handle_asks_the_daemon_once_instead_of_listing_every_model(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", offline=True, fsync=False)
    digests = write_entries(settings.cache_dir, 1001)  # more than the CLI's page: a listing takes two requests
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_OFFLINE": "1"})
    try:
        env = {**cli_env(settings), "HUBD_SOCKET": str(daemon.socket_path)}
        rm = [sys.executable, "-m", "hubd", "rm", "https://tfhub.dev/scale/model-3/1"]
        removed = subprocess.run(rm, env=env, capture_output=True, text=True, timeout=120)
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.startswith(f"removed {digests[3][:12]}")
        samples, _types = scrape(daemon)
        listings = {
            labels: n
            for (name, labels), n in samples.items()
            if name == "hubd_requests_total" and ("route", "/v1/models") in labels
        }
        assert list(listings.values()) == [1.0], listings
        left = daemon.request("GET", "/v1/models").json()["models"]
        assert sorted(m["id"] for m in left) == sorted(d for i, d in enumerate(digests) if i != 3)
    finally:
        daemon.stop()


def test_status_counts_every_entry_and_pages_its_users(large: tuple[Daemon, Settings, list[str]]) -> None:
    daemon = large[0]
    first = daemon.request("GET", "/v1/status?limit=2").json()
    assert (first["entries"], first["broken"], first["pinned"], first["size_bytes"]) == (
        ENTRIES,
        0,
        0,
        ENTRIES * 64,
    )
    assert [(u["uid"], u["entries"], u["size_bytes"]) for u in first["users"]] == [
        (1000, 600, 600 * 64),
        (1002, 505, 505 * 64),
    ]
    rest = daemon.request("GET", f"/v1/status?limit=2&cursor={first['next_cursor']}").json()
    assert [(u["uid"], u["entries"]) for u in rest["users"]] == [(1001, 10)]
    assert rest["next_cursor"] is None


def test_status_leaves_out_a_broken_entry(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", offline=True, fsync=False)
    digests = write_entries(settings.cache_dir, 3, {1000: range(3)})
    quarantined = settings.cache_dir / "quarantine" / digests[1]
    (settings.cache_dir / "objects" / digests[1]).rename(quarantined)  # as a failed verification leaves it
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_OFFLINE": "1"})
    try:
        status = daemon.request("GET", "/v1/status").json()
    finally:
        daemon.stop()
    assert (status["entries"], status["broken"], status["size_bytes"]) == (2, 1, 128)
    assert [(u["uid"], u["entries"], u["size_bytes"]) for u in status["users"]] == [(1000, 2, 128)]


def test_hubd_ls_follows_the_pages_and_json_still_lists_every_model(
    large: tuple[Daemon, Settings, list[str]],
) -> None:
    daemon, settings, digests = large
    env = {**cli_env(settings), "HUBD_SOCKET": str(daemon.socket_path)}
    listed = subprocess.run(
        [sys.executable, "-m", "hubd", "ls", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert sorted(entry["id"] for entry in json.loads(listed.stdout)) == sorted(digests)
    table = subprocess.run(
        [sys.executable, "-m", "hubd", "ls"], env=env, capture_output=True, text=True, timeout=120
    )
    assert table.returncode == 0 and len(table.stdout.splitlines()) == ENTRIES + 1
    status = subprocess.run(
        [sys.executable, "-m", "hubd", "status", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["entries"] == ENTRIES


# -- the watcher within a bounded number of inotify watches ---------------------------------------------------


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def watches(daemon: Daemon) -> int:
    """inotify watches the daemon holds, as the kernel counts them (/proc/PID/fdinfo)."""
    count = 0
    for info in Path(f"/proc/{daemon.proc.pid}/fdinfo").iterdir():
        try:
            count += sum(line.startswith("inotify wd:") for line in info.read_text().splitlines())
        except OSError:
            continue
    return count


def test_watches_beyond_the_limit_fall_back_to_the_scrub_with_one_log_line(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    paths = [upstream.publish("reusable"), upstream.publish("text_embedding"), upstream.publish("large_4mb")]
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_MAX_WATCHES": "4", "HUBD_SCRUB_INTERVAL": "0.2"})
    try:
        entries = [daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json() for path in paths]
        assert all("path" in entry for entry in entries), entries
        assert daemon.log().count("periodic scrub") == 1, daemon.log()
        assert watches(daemon) <= 4
        # The last entry got no watch: the scrub finds a file whose size changed, and the entry is healed.
        variables = Path(entries[-1]["path"], "variables")
        shard = next(variables.glob("variables.data-*"))
        original = shard.read_bytes()
        variables.chmod(0o755)
        shard.chmod(0o644)
        shard.write_bytes(original[:-1])
        assert upstream.server.wait_requests(paths[-1], 2), daemon.log()  # re-fetched
        healed = daemon.request("POST", "/v1/resolve", {"handle": tfhub(paths[-1])}).json()
        assert Path(healed["path"], "variables", shard.name).read_bytes() == original
        assert daemon.log().count("periodic scrub") == 1
    finally:
        daemon.stop()


def test_the_watcher_watches_the_entries_in_use_not_the_whole_cache(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", offline=True, fsync=False)
    write_entries(settings.cache_dir, 300)
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_OFFLINE": "1"})
    try:
        assert watches(daemon) <= 2  # objects/ (and manifests' folders, none here): no entry used yet
        daemon.request("POST", "/v1/resolve", {"handle": "https://tfhub.dev/scale/model-7/1"})
        assert "periodic scrub" not in daemon.log()
    finally:
        daemon.stop()
