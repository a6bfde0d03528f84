"""The admin token over TCP (red team 2): any local user may bind the daemon's loopback port while the daemon is
down, and a CLI given HUBD_URL and a token file used to send `Authorization: Bearer <token>` to whatever answered
there. Now the token goes only to a port served by a trusted user (root, `hubd`, yourself, HUBD_SOCKET_OWNER),
judged by the server end of the very connection it is sent on.

- A real unprivileged attacker serves the port (on 127.0.0.1, the IPv4 wildcard, or the dual-stack IPv6
  wildcard); root's CLI with a token refuses with `untrusted_socket` and the attacker never sees the token.
- The same CLI without a token still talks to whatever listens (plain TCP requests work as before), and with
  HUBD_SOCKET_OWNER naming the attacker it sends the token: the recording server would have caught it.
- Root's real daemon on loopback TCP still takes admin commands from the CLI with the token.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hubd.config import Settings
from tests.conftest import Upstream, cli_env
from tests.daemon import start_daemon
from tests.users import LocalUser

TOKEN = "s3cret-admin-token-for-tests"

#: The attacker's server: answers 200 to anything, printing each request's method, path and Authorization.
RECORDER = r"""
import http.server, socket, socketserver, sys
host = sys.argv[1]

class Recorder(http.server.BaseHTTPRequestHandler):
    def answer(self):
        print("REQUEST", self.command, self.path, self.headers.get("Authorization") or "-", flush=True)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = do_PUT = answer

    def log_message(self, *args):
        pass

class Server(http.server.HTTPServer):
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: its getfqdn needs codecs the user cannot read
        self.server_name, self.server_port = host, self.server_address[1]

server = Server((host, 0), Recorder)
print("PORT", server.server_address[1], flush=True)
server.serve_forever()
"""


@dataclass
class Impostor:
    """The attacker's recording server, and what it has printed so far."""

    proc: subprocess.Popen[str]
    port: int
    seen: list[str] = field(default_factory=list)

    def requests(self) -> list[str]:
        """Every request it has handled: a last request of the test's own, answered after all earlier ones (the
        server handles one connection at a time), marks the end, so nothing is missed and nothing waits."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("GET", "/end-of-test")
        connection.getresponse().read()
        connection.close()
        assert self.proc.stdout is not None
        while not (self.seen and "/end-of-test" in self.seen[-1]):
            line = self.proc.stdout.readline()
            assert line, f"the attacker's server died: {self.seen}"
            if line.startswith("REQUEST"):
                self.seen.append(line.strip())
        return [line for line in self.seen if "/end-of-test" not in line]


@contextmanager
def impostor(attacker: LocalUser, host: str) -> Iterator[Impostor]:
    proc = attacker.spawn_python(RECORDER, host)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("PORT "), first + proc.stdout.read()
        yield Impostor(proc, int(first.split()[1]))
    finally:
        proc.kill()
        proc.communicate()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubd", *args], env=env, capture_output=True, text=True, timeout=120
    )


def plain_env(tmp_path: Path, url: str) -> dict[str, str]:
    """Root's CLI aimed at `url`, with nothing else of hubd's configured (no daemon socket, a cache of its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBD_")}
    return {
        **env,
        "HUBD_URL": url,
        "HUBD_SOCKET": str(tmp_path / "no-daemon.sock"),
        "HUBD_CACHE_DIR": str(tmp_path / "cache"),
    }


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::"])
def test_the_token_is_not_sent_to_a_port_another_user_serves(
    attacker: LocalUser, tmp_path: Path, host: str
) -> None:
    with impostor(attacker, host) as fake:
        env = plain_env(tmp_path, f"http://127.0.0.1:{fake.port}")
        refused = run_cli("gc", "--dry-run", "--json", "--token-file", str(token_file(tmp_path)), env=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        error = json.loads(refused.stdout.splitlines()[-1])["error"]
        assert error["code"] == "untrusted_socket", error
        assert f"port {fake.port}" in error["message"] and attacker.name in error["message"], error
        assert "HUBD_SOCKET_OWNER" in error["hint"], error
        assert fake.requests() == []  # not even the health probe: it would have carried the token
        assert TOKEN not in refused.stdout + refused.stderr


def test_without_a_token_the_cli_still_talks_to_any_port(attacker: LocalUser, tmp_path: Path) -> None:
    """No credentials, nothing to check: the request goes out as before (and the recorder sees it)."""
    with impostor(attacker, "127.0.0.1") as fake:
        run_cli("gc", "--dry-run", "--json", env=plain_env(tmp_path, f"http://127.0.0.1:{fake.port}"))
        seen = fake.requests()
        assert seen and all(line.endswith(" -") for line in seen), seen


def test_a_port_owner_named_in_hubd_socket_owner_gets_the_token(attacker: LocalUser, tmp_path: Path) -> None:
    """Whom the user trusts by name is trusted with the token; this is also the recorder catching a token, so
    its silence above means something."""
    with impostor(attacker, "127.0.0.1") as fake:
        env = {**plain_env(tmp_path, f"http://127.0.0.1:{fake.port}"), "HUBD_SOCKET_OWNER": attacker.name}
        run_cli("gc", "--dry-run", "--json", "--token-file", str(token_file(tmp_path)), env=env)
        seen = fake.requests()
        assert seen and all(line.endswith(f"Bearer {TOKEN}") for line in seen), seen


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0"])
def test_roots_daemon_on_loopback_tcp_still_takes_the_token(
    settings: Settings, upstream: Upstream, tmp_path: Path, listen: str
) -> None:
    d = start_daemon(settings, tmp_path, "--listen", listen, "--token-file", str(token_file(tmp_path)))
    try:
        entry = d.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{upstream.publish('reusable')}"})
        env = {**cli_env(settings), "HUBD_URL": d.tcp[0], "HUBD_TOKEN_FILE": str(tmp_path / "token")}
        planned = run_cli("gc", "--dry-run", "--json", env=env)
        assert planned.returncode == 0, planned.stderr
        removed = run_cli("rm", entry.json()["id"], env=env)
        assert removed.returncode == 0, removed.stderr
        assert d.request("GET", f"/v1/models/{entry.json()['id']}").status == 404
    finally:
        d.stop()
