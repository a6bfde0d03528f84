"""Operational mistakes (#13 item 8): permissions, missing directories, a port already taken, a missing group.
Each is one `hubd: error: ... (hint: ...)` line and exit status 1, never a traceback; run by a real user."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.users import LocalUser, shared_dir
from tests.workstation import CLI, run_as_member


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


CASES = {
    "cache-in-roots-home": (["ls", "--cache-dir", "/root/hubd-cache"], "Permission denied: /root/hubd-cache"),
    "serve-cache-in-roots-home": (["serve", "--cache-dir", "/root/hubd-cache"], "/root/hubd-cache"),
    "cache-under-a-file": (["ls", "--cache-dir", "/etc/passwd/cache"], "/etc/passwd/cache"),
    "missing-socket-group": (["serve", "--socket-group", "no-such-hubd-group"], "no-such-hubd-group"),
    "missing-admin-group": (["serve", "--admin-group", "no-such-hubd-group"], "no-such-hubd-group"),
    "manifest-where-nothing-may-be-made": (
        ["serve", "--manifest", "/nonexistent-hubd/m.toml"],
        "/nonexistent-hubd",
    ),
    "privileged-port": (["serve", "--listen", "127.0.0.1:1"], "cannot listen on 127.0.0.1:1"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_an_operational_mistake_is_one_error_line_with_a_hint(victim: LocalUser, case: str) -> None:
    args, named = CASES[case]
    with shared_dir() as public:
        runtime = public / "run"
        runtime.mkdir()
        runtime.chmod(0o1777)  # like /tmp: the user's own socket directory is made there
        env = {"XDG_RUNTIME_DIR": str(runtime), "HUBD_CACHE_DIR": str(runtime / "cache")}
        if args[0] == "serve":
            env["HUBD_SOCKET"] = str(runtime / "victim" / "hubd.sock")
        result = run_as_member(victim, CLI, *args, env=env)
    assert_one_error_line(result.returncode, result.stderr, named)


def test_a_port_already_taken_is_one_error_line(victim: LocalUser, taken_port: int) -> None:
    with shared_dir() as public:
        runtime = public / "run"
        runtime.mkdir()
        runtime.chmod(0o1777)
        env = {"HUBD_SOCKET": str(runtime / "victim" / "hubd.sock"), "HUBD_CACHE_DIR": str(runtime / "cache")}
        result = run_as_member(victim, CLI, "serve", "--listen", f"127.0.0.1:{taken_port}", env=env)
    assert_one_error_line(result.returncode, result.stderr, "Address already in use")


def assert_one_error_line(status: int, stderr: str, named: str) -> None:
    assert status == 1 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("hubd: error:")]
    assert len(errors) == 1, stderr
    assert named in errors[0] and "(hint: " in errors[0], errors[0]
    assert stderr.rstrip().splitlines()[-1] == errors[0]  # nothing after it: the error is the last word
