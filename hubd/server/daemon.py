"""`hubd serve`: the daemon's lifecycle in one place: bind, start, ready, serve, drain, clean up."""

from __future__ import annotations

import asyncio
import errno
import grp
import ipaddress
import logging
import os
import resource
import signal
import socket
import stat
import sys
from pathlib import Path

from aiohttp import web
from hubd_client.paths import is_system_daemon, socket_dir_problem

from hubd.config import Settings
from hubd.engine import Engine
from hubd.errors import BadRequest
from hubd.server import logs
from hubd.server.app import create_app
from hubd.server.connections import ConnectionLimits
from hubd.server.guards import AdminPolicy
from hubd.server.mirror import create_mirror_app
from hubd.server.routes import CONNECTIONS
from hubd.server.systemd import inherited_sockets, notify
from hubd.watch import Watchers

log = logging.getLogger("hubd")
#: Members may use the system daemon's socket (systemd/hubd.socket's SocketGroup).
SYSTEM_SOCKET_GROUP = "hubd-users"
#: File descriptors kept for files, the index and downloads beyond the API's connections.
FILE_DESCRIPTOR_RESERVE = 256


def parse_listen(spec: str) -> tuple[str, int]:
    """'127.0.0.1:8750', '[::1]:8750', 'localhost:8750' -> (host, port); anything not loopback is refused."""
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not host:
        raise BadRequest(f"invalid listen address {spec!r}", "use HOST:PORT, e.g. 127.0.0.1:8750")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BadRequest(
            f"refusing to listen on {spec!r}: not a loopback address",
            "hubd's API is local only; use 127.0.0.1, [::1] or localhost (a LAN mirror is a separate listener)",
        )
    return host, int(port)


def bind_tcp(spec: str) -> socket.socket:
    host, port = parse_listen(spec)
    return _bound(host, port, spec)


def bind_mirror(spec: str) -> socket.socket:
    """The LAN mirror may listen on any address: it is an explicit opt-in for serving other machines."""
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not sep or not port.isdigit():
        raise BadRequest(f"invalid mirror address {spec!r}", "use HOST:PORT, e.g. 0.0.0.0:8760")
    return _bound(host, int(port), spec)


def _bound(host: str, port: int, spec: str) -> socket.socket:
    """A TCP socket bound to (host, port), or one error line saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hints = {
            errno.EADDRINUSE: "another process listens on it (`ss -ltnp`): stop it, or choose another port",
            errno.EACCES: "ports below 1024 need root: choose a port above 1024",
            errno.EADDRNOTAVAIL: "this machine has no such address: use 127.0.0.1 or ::1",
        }
        raise BadRequest(
            f"cannot listen on {spec}: {exc.strerror}", hints.get(exc.errno or 0, "choose another address")
        ) from None
    return sock


def socket_access(settings: Settings) -> tuple[int, int | None]:
    """(mode, group) of the API socket: the system daemon's is for one group, a user's daemon's for its user.

    Never world-writable: whoever can connect can ask the daemon to download and can read the cache's listing.
    """
    name = settings.socket_group or (SYSTEM_SOCKET_GROUP if is_system_daemon() else None)
    if name is None:
        return 0o600, None
    try:
        return 0o660, grp.getgrnam(name).gr_gid
    except KeyError:
        if settings.socket_group:
            raise BadRequest(
                f"the socket group {name!r} does not exist", "create it (groupadd), or unset HUBD_SOCKET_GROUP"
            ) from None
        return 0o660, None  # no hubd-users group: the daemon's own group only


def socket_dir(path: Path) -> Path:
    """Create (0700 for a user's daemon) and check the socket's directory; the socket's real path.

    Without XDG_RUNTIME_DIR a user's socket lives in /tmp/hubd-UID, which any user could create first and fill
    with a server of their own; so the directory must belong to this user (root or this user for the system
    daemon) and be writable by nobody else, and so must every directory above it (sticky ones excepted).
    """
    system = is_system_daemon()
    directory = path.parent
    try:
        directory.mkdir(mode=0o755 if system else 0o700, parents=True, exist_ok=True)
        problem = socket_dir_problem(directory, {0, os.geteuid()}, owner=None if system else os.geteuid())
    except OSError as exc:
        raise BadRequest(
            f"cannot use the socket directory {directory}: {exc.strerror}",
            "create it for this user, or choose another place with --socket / HUBD_SOCKET",
        ) from None
    if problem is not None:
        raise BadRequest(
            f"refusing to serve on {path}: {problem}, so another user could impersonate hubd",
            f"if you did not make {directory}, someone may be trying to intercept your requests: have root remove "
            "it, or set XDG_RUNTIME_DIR or --socket to a directory only you can write",
        )
    return Path(os.path.realpath(directory)) / path.name


def bind_unix(path: Path, mode: int, group: int | None = None) -> socket.socket:
    path = socket_dir(path)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise BadRequest(f"{path} exists and is not a socket", "remove it or choose another socket path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: its daemon is gone
        else:
            raise BadRequest(f"another hubd is already serving {path}", "stop it first, or pass another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 ^ mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    try:
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
    except PermissionError:
        sock.close()
        path.unlink(missing_ok=True)
        name = grp.getgrgid(group).gr_name if group is not None else "?"
        raise BadRequest(
            f"cannot give the socket {path} to group {name}",
            "the daemon's user must be a member of the socket group (HUBD_SOCKET_GROUP)",
        ) from None
    return sock


class Daemon:
    def __init__(self, settings: Settings, socket_mode: int | None = None) -> None:
        self.settings = settings
        self.socket_mode, self.socket_gid = socket_access(settings)
        if socket_mode is not None:
            self.socket_mode = socket_mode
        self.engine = Engine(settings)
        self.limits = ConnectionLimits(
            settings.max_connections, settings.max_connections_per_user, settings.header_timeout
        )
        self.mirror_limits = ConnectionLimits(  # the LAN's own listener: every client is TCP there
            settings.max_connections,
            settings.max_connections_per_user,
            settings.header_timeout,
            max_tcp=settings.max_connections,
        )
        self._stop = asyncio.Event()
        self._owned_socket: Path | None = None

    async def run(self) -> None:
        if "LISTEN_FDS" not in os.environ:
            socket_dir(self.settings.socket)  # a socket directory someone else controls: refuse before any work
        asyncio.get_running_loop().set_exception_handler(self.limits.resource_log)
        await self.engine.start()
        app = create_app(
            self.engine,
            AdminPolicy(
                self.settings.admin_group, self.settings.token_file, self.settings.trust_foreign_namespaces
            ),
        )
        app[CONNECTIONS] = self.limits
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=logs.access_log(),
            access_log_format=logs.ACCESS_FORMAT,
            shutdown_timeout=30,
            keepalive_timeout=self.settings.idle_timeout,
        )
        await runner.setup()
        mirror_runner = web.AppRunner(
            create_mirror_app(self.engine),
            handle_signals=False,
            access_log=None,
            keepalive_timeout=self.settings.idle_timeout,
        )
        await mirror_runner.setup()
        watchers = Watchers(self.engine, self.settings)
        try:
            addresses = await self._start_sites(runner)
            for spec in self.settings.mirror_listen:
                sock = bind_mirror(spec)
                host, port = sock.getsockname()[:2]
                await self.mirror_limits.site(mirror_runner, sock).start()  # the LAN's own limits
                addresses.append(f"mirror:http://{host if ':' not in host else f'[{host}]'}:{port}")
            watchers.start(asyncio.get_running_loop())
            view_task = asyncio.create_task(self.engine.rebuild_view())
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            log.info("hubd ready: %s (cache %s)", " ".join(addresses), self.settings.cache_dir)
            notify("READY=1\nSTATUS=serving " + " ".join(addresses))
            await self._stop.wait()
            view_task.cancel()
            log.info("hubd stopping: draining requests")
            notify("STOPPING=1")
        finally:
            watchers.stop()
            await mirror_runner.cleanup()
            await runner.cleanup()  # stops accepting, lets in-flight requests finish (up to shutdown_timeout)
            await self.engine.close()  # cancels fetches nobody waits on; their staging is removed
            if self._owned_socket is not None:
                self._owned_socket.unlink(missing_ok=True)
            log.info("hubd stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _start_sites(self, runner: web.AppRunner) -> list[str]:
        sockets = inherited_sockets()
        if not sockets:
            sockets.append(bind_unix(self.settings.socket, self.socket_mode, self.socket_gid))
            self._owned_socket = Path(sockets[0].getsockname())
            sockets += [bind_tcp(spec) for spec in self.settings.listen]
        addresses = []
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                host, port = sock.getsockname()[:2]
                if not ipaddress.ip_address(host).is_loopback:
                    raise BadRequest(f"refusing a non-loopback socket {host}:{port}", "bind 127.0.0.1 or ::1")
                addresses.append(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
            else:
                addresses.append(f"unix:{sock.getsockname()}")
            await self.limits.site(runner, sock).start()
        return addresses


def check_descriptors(settings: Settings) -> None:
    """Warn when the connection limit leaves too few descriptors for files (systemd's LimitNOFILE= sets it)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    connections = settings.max_connections * (2 if settings.mirror_listen else 1)  # the mirror has its own
    if soft != resource.RLIM_INFINITY and connections + FILE_DESCRIPTOR_RESERVE > soft:
        log.warning(
            "%d connections (HUBD_MAX_CONNECTIONS) leave less than %d of the %d file descriptors (RLIMIT_NOFILE) "
            "for files; raise LimitNOFILE or lower HUBD_MAX_CONNECTIONS",
            connections,
            FILE_DESCRIPTOR_RESERVE,
            soft,
        )


GIL_SWITCH_SECONDS = 0.001
"""How long a worker thread (hashing a verify, stat-ing a 20,000-file hit, inflating) may hold the GIL before the
event loop gets it back. Python's 5 ms default is what each step of a /v1/health answer waited under load: 1 ms
took its p99 under the combined hostile load from 17.1-21.8 ms to 16.8-19.2 ms (three runs each,
bench/bench_health.py on two cores of a quiet 16-core machine, taskset)."""


def serve(settings: Settings, log_level: str | None = None) -> int:
    logs.configure(log_level)
    check_descriptors(settings)
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    asyncio.run(Daemon(settings).run())
    return 0
