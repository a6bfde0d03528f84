"""A shared workstation for tests: root's daemon on a socket that real local users reach, and their requests."""

from __future__ import annotations

import grp
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hubd.config import Settings
from tests.daemon import Daemon, Reply, start_daemon
from tests.users import LocalUser, make_reachable, shared_dir

#: One HTTP request over a Unix socket, as whoever runs it: prints {"status", "body"} as JSON.
REQUEST = r"""
import http.client, json, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(120)
        self.sock.connect(sys.argv[1])
conn = Unix("localhost", timeout=120)
conn.request(sys.argv[2], sys.argv[3], body=sys.argv[4] or None, headers={"Content-Type": "application/json"})
response = conn.getresponse()
print(json.dumps({"status": response.status, "body": response.read().decode()}))
"""

#: `hubd ...` (the CLI's main) as the user, arguments after the code.
CLI = "import sys, hubd.cli; sys.exit(hubd.cli.main(sys.argv[1:]))"


@contextmanager
def workstation(
    settings: Settings, *users: LocalUser, extra: tuple[str, ...] = (), **env: str
) -> Iterator[Daemon]:
    """Root's daemon on a socket in a directory everyone can traverse, for a group holding `users`, and a cache
    they can read (as root's systemd unit sets it up)."""
    group = ensure_group(*users)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    make_reachable(settings.cache_dir)
    with shared_dir(mode=0o755) as public:
        d = start_daemon(settings, public, *extra, env_extra={"HUBD_SOCKET_GROUP": group, **env})
        try:
            yield d
        finally:
            d.stop()


def visible(settings: Settings, public: Path) -> Settings:
    """`settings` with the cache under `public` (a `shared_dir`): users must reach the paths the daemon returns,
    and pytest's tmp root is 0700 (other pytest sessions set it back so while a test runs)."""
    return settings.model_copy(update={"cache_dir": public / "cache"})


def ensure_group(*users: LocalUser) -> str:
    """The group test daemons give their socket to, with `users` in it; its name."""
    group = "hubd-ws-test"
    try:
        grp.getgrnam(group)
    except KeyError:
        subprocess.run(["groupadd", group], check=True, capture_output=True)
    for user in users:
        subprocess.run(["usermod", "-aG", group, user.name], check=True, capture_output=True)
    return group


def run_as_member(
    user: LocalUser, code: str, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Python `code` as `user`, with the supplementary groups the account has (so the socket's group counts)."""
    return subprocess.run(
        [sys.executable, "-c", _AS_MEMBER, str(user.uid), str(user.gid), code, *argv],
        env={
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(user.home),
            "USER": user.name,
            "LANG": "C.UTF-8",
            **(env or {}),
        },
        cwd=user.home,
        capture_output=True,
        text=True,
        timeout=180,
    )


def request_as(user: LocalUser, d: Daemon, method: str, path: str, body: Any = None) -> Reply:
    """A request from `user`'s own process (its uid is what the daemon sees), in the socket's group."""
    payload = json.dumps(body) if body is not None else ""
    result = run_as_member(user, REQUEST, str(d.socket_path), method, path, payload)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    return Reply(reply["status"], {}, reply["body"].encode())


def cli_as(
    user: LocalUser, d: Daemon, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`hubd ARGS` as `user` against the daemon `d`."""
    full_env = {"HUBD_SOCKET": str(d.socket_path), "HUBD_CACHE_DIR": str(user.home / "own-cache"), **(env or {})}
    return run_as_member(user, CLI, *args, env=full_env)


# Drop to the user with the groups the account database gives it (usermod -aG above), then run the code.
_AS_MEMBER = """
import os, pwd, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
import asyncio, http.client, json, socket, time, concurrent.futures.thread, encodings.idna
import hubd.cli, hubd.api_client, hubd.server.routes, hubd_client, hubd_client.resolver, hubd_client.transport
import ctypes, hubd.server.daemon, hubd.watch, hubd.server.systemd, watchdog.observers, pdb, ssl
os.initgroups(pwd.getpwuid(uid).pw_name, gid)
os.setgid(gid)
os.setuid(uid)
code = sys.argv[3]
sys.argv = ["-c", *sys.argv[4:]]
exec(compile(code, "<as-user>", "exec"))
"""


def records(d: Daemon, **query: str) -> list[dict[str, Any]]:
    """The audit trail as root (an admin) reads it."""
    from urllib.parse import urlencode

    reply = d.request("GET", "/v1/audit" + (f"?{urlencode(query)}" if query else ""))
    assert reply.status == 200, reply.body
    return list(reply.json()["records"])
