"""The audit trail (#13 item 5): every delete, eviction, pin, unpin, quarantine, heal and import, with who did it
and how it ended; for admins only; durable across a crash; rotated by size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubd.audit import AuditLog
from hubd.config import Settings
from tests.conftest import Upstream, cli_env
from tests.daemon import start_daemon
from tests.users import LocalUser
from tests.workstation import cli_as, records, request_as, workstation


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def test_imports_pins_unpins_and_deletes_name_who_did_them(
    settings: Settings, upstream: Upstream, victim: LocalUser, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    with workstation(settings, victim) as d:
        entry = request_as(victim, d, "POST", "/v1/resolve", {"handle": tfhub(path)}).json()
        manifest = {"model": [{"handle": tfhub(path), "pin": True}], "source": "/etc/hubd/course.toml"}
        assert d.request("POST", "/v1/prefetch", manifest).status == 200
        assert d.request("DELETE", f"/v1/models/{entry['id']}").status == 409  # pinned: refused, and recorded
        assert d.request("DELETE", f"/v1/models/{entry['id']}?force=1").status == 200

        trail = [(r["action"], r["uid"], r["user"], r["model_id"], r["outcome"]) for r in records(d)]
        assert trail == [
            ("import", victim.uid, victim.name, entry["id"], "ok"),
            ("pin", 0, "root", entry["id"], "ok"),
            ("delete", 0, "root", entry["id"], trail[2][4]),
            ("unpin", 0, "root", entry["id"], "ok"),
            ("delete", 0, "root", entry["id"], "ok"),
        ]
        assert trail[2][4].startswith("refused: pinned by") and "/etc/hubd/course.toml" in trail[2][4]
        assert records(d)[0]["handle"] == tfhub(path)

        audit_dir = settings.cache_dir / "audit"
        assert audit_dir.stat().st_mode & 0o777 == 0o700
        assert (audit_dir / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_only_admins_read_the_trail(settings: Settings, upstream: Upstream, victim: LocalUser) -> None:
    with workstation(settings, victim) as d:
        request_as(victim, d, "POST", "/v1/resolve", {"handle": tfhub(upstream.publish("reusable"))})
        assert request_as(victim, d, "GET", "/v1/audit").status == 403
        denied = cli_as(victim, d, "audit")
        assert denied.returncode == 1 and denied.stderr.startswith("hubd: error:"), denied.stderr
        assert len(records(d)) == 1


@pytest.mark.slow
def test_audit_filters_by_action_user_and_time(
    settings: Settings, upstream: Upstream, victim: LocalUser, attacker: LocalUser
) -> None:
    first, second = upstream.publish("reusable"), upstream.publish("text_embedding")
    with workstation(settings, victim, attacker) as d:
        request_as(victim, d, "POST", "/v1/resolve", {"handle": tfhub(first)})
        middle = time.time()
        b = request_as(attacker, d, "POST", "/v1/resolve", {"handle": tfhub(second)}).json()
        assert d.request("DELETE", f"/v1/models/{b['id']}").status == 200

        env = {**cli_env(settings), "HUBD_SOCKET": str(d.socket_path)}

        def hubd_audit(*args: str) -> list[dict[str, object]]:
            out = subprocess.run(
                [sys.executable, "-m", "hubd", "audit", "--json", *args], env=env, capture_output=True
            )
            assert out.returncode == 0, out.stderr
            return list(json.loads(out.stdout))

        assert [r["action"] for r in hubd_audit()] == ["import", "import", "delete"]
        assert [r["uid"] for r in hubd_audit("--uid", attacker.name)] == [attacker.uid]
        assert [r["uid"] for r in hubd_audit("--uid", str(victim.uid))] == [victim.uid]
        assert [r["model_id"] for r in hubd_audit("--action", "delete")] == [b["id"]]
        assert [r["uid"] for r in hubd_audit("--since", str(middle))] == [attacker.uid, 0]
        assert [r["uid"] for r in hubd_audit("--until", str(middle))] == [victim.uid]
        table = subprocess.run([sys.executable, "-m", "hubd", "audit"], env=env, capture_output=True, text=True)
        assert "delete" in table.stdout and attacker.name in table.stdout


def test_the_trail_survives_a_crash_and_a_torn_last_line(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    first, second = upstream.publish("reusable"), upstream.publish("text_embedding")
    d = start_daemon(settings, tmp_path)
    a = d.request("POST", "/v1/resolve", {"handle": tfhub(first)}).json()
    assert d.request("DELETE", f"/v1/models/{a['id']}").status == 200
    d.proc.send_signal(signal.SIGKILL)  # no clean shutdown: what was acknowledged must be on disk
    d.proc.wait()
    trail = settings.cache_dir / "audit" / "audit.jsonl"
    with open(trail, "ab") as f:
        f.write(b'{"time": 1700000000.0, "uid": 0, "action": "del')  # a write the crash cut short
    d = start_daemon(settings, tmp_path)
    try:
        d.request("POST", "/v1/resolve", {"handle": tfhub(second)})
        trail_now = [(r["action"], r["handle"]) for r in records(d)]
        assert trail_now == [
            ("import", tfhub(first)),
            ("delete", f"tfhub.dev/{first}"),
            ("import", tfhub(second)),
        ]
    finally:
        d.stop()


def test_evictions_are_recorded_as_the_daemons(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    path = upstream.publish("reusable")
    env = {**cli_env(settings), "HUBD_GC_GRACE": "0"}
    pulled = subprocess.run([sys.executable, "-m", "hubd", "pull", tfhub(path)], env=env, capture_output=True)
    assert pulled.returncode == 0, pulled.stderr
    gc = subprocess.run([sys.executable, "-m", "hubd", "gc", "--max-size", "1"], env=env, capture_output=True)
    assert gc.returncode == 0, gc.stderr
    trail = list(AuditLog(settings.cache_dir).read())
    assert [(r.action, r.uid) for r in trail] == [("import", os.getuid()), ("evict", None)]


def test_quarantine_and_heal_are_recorded(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    path = upstream.publish("reusable")
    d = start_daemon(settings, tmp_path)
    try:
        entry = d.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()
        shard = Path(entry["path"], "variables", "variables.data-00000-of-00001")
        shard.parent.chmod(0o755)
        shard.chmod(0o644)
        shard.write_bytes(b"\0" * shard.stat().st_size)
        report = d.request("POST", "/v1/verify", {"handle": entry["id"]}).json()
        assert report["results"][0]["healed"] is True
        actions = [(r["action"], r["outcome"]) for r in records(d) if r["action"] != "import"]
        assert ("quarantine", "ok") in actions and ("heal", "ok") in actions
        assert actions.index(("quarantine", "ok")) < actions.index(("heal", "ok"))
    finally:
        d.stop()
