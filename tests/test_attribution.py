"""Attribution (#13 item 4): each entry lists the uids that asked for it, durably; `hubd status` shows bytes per
user. Real users resolve through root's daemon; the uid is the kernel's word (SO_PEERCRED)."""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import time
from pathlib import Path

import pytest

from hubd.config import Settings
from tests.conftest import Upstream
from tests.daemon import call
from tests.users import LocalUser
from tests.workstation import cli_as, request_as, workstation


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def test_each_entry_lists_the_users_that_asked_for_it(
    settings: Settings, upstream: Upstream, victim: LocalUser, attacker: LocalUser
) -> None:
    shared, own = upstream.publish("reusable"), upstream.publish("text_embedding")
    with workstation(settings, victim, attacker) as d:
        for user in (victim, attacker):
            assert request_as(user, d, "POST", "/v1/resolve", {"handle": tfhub(shared)}).status == 200
        mine = request_as(victim, d, "POST", "/v1/resolve", {"handle": tfhub(own)}).json()
        assert mine["users"] == [victim.uid]
        models = {m["id"]: m for m in d.request("GET", "/v1/models").json()["models"]}
        by_handle = {m["handles"][0]: m for m in models.values()}
        assert by_handle[f"tfhub.dev/{shared}"]["users"] == sorted([victim.uid, attacker.uid])
        assert by_handle[f"tfhub.dev/{own}"]["users"] == [victim.uid]
        one = d.request("GET", f"/v1/models/{mine['id']}").json()
        assert one["users"] == [victim.uid]


def test_users_survive_a_restart_and_a_lost_index(
    settings: Settings, upstream: Upstream, victim: LocalUser
) -> None:
    path = upstream.publish("reusable")
    with workstation(settings, victim) as d:
        entry = request_as(victim, d, "POST", "/v1/resolve", {"handle": tfhub(path)}).json()
    for derived in settings.cache_dir.glob("index*"):  # the derived index, whatever its files are called
        if derived.is_file():
            derived.unlink()
    (settings.cache_dir / "cache.db").unlink(missing_ok=True)
    with workstation(settings, victim) as d:
        assert d.request("GET", f"/v1/models/{entry['id']}").json()["users"] == [victim.uid]
    users_file = settings.cache_dir / "users" / f"{entry['id']}.json"
    assert users_file.stat().st_mode & 0o077 == 0  # who uses what is the daemon's to tell, not world-readable


@pytest.mark.slow
def test_ls_filters_by_user_and_status_shows_bytes_per_user(
    settings: Settings, upstream: Upstream, victim: LocalUser, attacker: LocalUser
) -> None:
    first, second = upstream.publish("reusable"), upstream.publish("text_embedding")
    with workstation(settings, victim, attacker) as d:
        a = request_as(victim, d, "POST", "/v1/resolve", {"handle": tfhub(first)}).json()
        b = request_as(attacker, d, "POST", "/v1/resolve", {"handle": tfhub(second)}).json()

        listed = cli_as(victim, d, "ls", "--user", victim.name, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [e["id"] for e in json.loads(listed.stdout)] == [a["id"]]

        table = cli_as(victim, d, "ls")
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert "USERS" in header.split()
        row_a = next(r for r in rows if r.startswith(a["id"][:12]))
        assert victim.name in row_a and attacker.name not in row_a

        status = cli_as(attacker, d, "status", "--json")
        assert status.returncode == 0, status.stderr
        usage = {u["uid"]: u for u in json.loads(status.stdout)["users"]}
        assert usage[victim.uid]["size_bytes"] == a["size_bytes"]
        assert usage[attacker.uid]["size_bytes"] == b["size_bytes"]
        assert usage[victim.uid]["user"] == victim.name
        text = cli_as(victim, d, "status")
        assert f"user      {victim.name}:" in text.stdout, text.stdout


def _flock_waiters(lock: Path) -> int:
    """Blocked flock requests on `lock`, as the kernel lists them ("->" lines of /proc/locks, which name the
    file as major:minor:inode)."""
    inode = f":{lock.stat().st_ino}"
    waiting = [line.split() for line in Path("/proc/locks").read_text().splitlines() if "->" in line]
    return sum(1 for fields in waiting if "FLOCK" in fields and fields[6].endswith(inode))


def test_recording_a_new_user_waits_off_the_event_loop(
    settings: Settings, upstream: Upstream, victim: LocalUser
) -> None:
    """The users record is rewritten under locks/users.lock, which every process on the cache shares. While
    another (trusted) process holds it, the daemon used to wait for it on its event loop: nobody was answered,
    not even /v1/health. The wait now runs in a thread."""
    path = upstream.publish("reusable")
    with workstation(settings, victim) as d:
        entry = d.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()  # cached, by root
        lock = settings.cache_dir / "locks" / "users.lock"
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                asked = pool.submit(request_as, victim, d, "POST", "/v1/resolve", {"handle": tfhub(path)})
                deadline = time.monotonic() + 60
                while _flock_waiters(lock) == 0:  # the daemon is now blocked on our lock
                    assert time.monotonic() < deadline and not asked.done(), "the resolve never reached the lock"
                conn = d.unix()
                conn.timeout = 10
                assert call(conn, "GET", "/v1/health").status == 200
                fcntl.flock(held, fcntl.LOCK_UN)
                assert asked.result(timeout=60).json()["users"] == sorted({0, victim.uid})
        assert d.request("GET", f"/v1/models/{entry['id']}").json()["users"] == sorted({0, victim.uid})
