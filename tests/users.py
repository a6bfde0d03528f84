"""Real unprivileged local users for attack tests: created with useradd, used through `subprocess(user=...)`.

CI runs as root, so every attack in the suite can be performed by an account that has no privileges at all.
Attackers run the system's Python (stdlib only) or the repository's code through `LocalUser.python`, which
drops to the user before the user's code runs; never as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CAN_SWITCH_USERS = os.geteuid() == 0 and shutil.which("useradd") is not None

needs_root = pytest.mark.skipif(not CAN_SWITCH_USERS, reason="creating and switching users needs root and useradd")


@dataclass(frozen=True)
class LocalUser:
    name: str
    uid: int
    gid: int
    home: Path

    def run(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        timeout: float = 120,
        cwd: Path | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `args` as this user, with a minimal environment (nothing of root's leaks in)."""
        base = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "LANG": "C.UTF-8",
        }
        return subprocess.run(
            args,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            env={**base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or self.home,
            input=input,
        )

    def python(
        self, code: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run Python `code` as this user with the repository's client and daemon code importable (see AS_USER)."""
        return subprocess.run(
            self._as_user(code, argv),
            env=self._env(env),
            capture_output=True,
            text=True,
            cwd=self.home,
            timeout=timeout,
        )

    def spawn_python(self, code: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start Python `code` as this user (see AS_USER); stdin, stdout and stderr are pipes, stderr on stdout."""
        return subprocess.Popen(
            self._as_user(code, argv),
            env=self._env(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.home,
        )

    def _as_user(self, code: str, argv: tuple[str, ...]) -> list[str]:
        return [sys.executable, "-c", AS_USER, str(self.uid), str(self.gid), code, *argv]

    def _env(self, env: dict[str, str] | None) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "LANG": "C.UTF-8",
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'client'}",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }


# The test interpreter (a venv under /root) is not executable by other users, so user code starts as root with it,
# imports what it may need while the files are still readable, then drops to the user for good (uid, gid, no
# supplementary groups) before running a single line of the user's code.
AS_USER = """
import os, sys
uid, gid, code = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import asyncio, ctypes, http.client, json, resource, selectors, socket, struct, time, concurrent.futures.thread
import gzip, hashlib, io, pickle, sqlite3, tarfile, tempfile, threading
# The CLI imports its backends lazily, so what the user's code may reach is imported here, while still root.
import hubd.cli, hubd.api_client, hubd.backends, hubd.engine, hubd.server.app, rich.progress
import hubd_client, hubd_client.resolver, hubd_client.offline, hubd_client.transport
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: as any process the user starts (setuid cleared it)
sys.argv = ["-c", *sys.argv[4:]]
exec(compile(code, "<as-user>", "exec"))
"""


def local_user(name: str) -> LocalUser:
    """The local account `name`, created (no login shell, own group, a home) if it does not exist yet."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    home.chmod(0o700)
    return LocalUser(name, entry.pw_uid, entry.pw_gid, home)


@contextmanager
def shared_dir(prefix: str = "hubd-shared-", mode: int = 0o755) -> Iterator[Path]:
    """A directory outside pytest's root-only tmp tree, so other users can reach what the test puts there."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_reachable(path: Path) -> None:
    """Let other users traverse every directory above `path` (pytest's tmp dirs are 0700 for root)."""
    for parent in [path, *path.parents]:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode & 0o777
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)
