"""Real unprivileged local users for attack tests: created with useradd, used through `subprocess(user=...)`.

CI runs as root, so every attack in the suite can be performed by an account that has no privileges at all.
Attackers run the system's Python (stdlib only) or the repository's client code through PYTHONPATH, never as root.
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
        """Run Python `code` as this user with the repository's client and daemon code importable."""
        full_env = {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'client'}", **(env or {})}
        return self.run([sys.executable, "-c", code, *argv], env=full_env, timeout=timeout)


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
