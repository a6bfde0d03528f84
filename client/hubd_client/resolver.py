"""resolve(handle) -> local path: ask the daemon; map the path into a container's view; fall back offline."""

from __future__ import annotations

import os

from hubd_client import transport
from hubd_client.errors import DaemonUnavailable, HubdClientError
from hubd_client.handles import is_local, parse_handle


def resolve(handle: str) -> str:
    """A local directory holding the SavedModel for `handle` (local paths are returned as they are)."""
    handle = os.fspath(handle)
    if is_local(handle):  # parse_handle's own rule: a scheme-less tfhub.dev/... is never a local directory
        if not os.path.exists(os.path.expanduser(handle.strip().removeprefix("file://"))):
            raise OSError(f"{handle} does not exist.")  # tensorflow_hub's error, word for word
        path = parse_handle(handle).local_path
        if not path:  # never "": loading "" loads whatever SavedModel is in the current directory
            raise HubdClientError("bad_handle", f"{handle!r} is not a local directory", "pass a model directory")
        return path
    try:
        # A pull's NDJSON stream rather than /v1/resolve: its first line comes at once and the daemon keeps it
        # alive while it fetches, so the client's short first-byte limit never cuts a long download short.
        request = {"handle": handle, "offline": True} if offline_wanted() else {"handle": handle}
        status, body = transport.request("POST", "/v1/pull", request, stream=True)
    except transport.NotAnswering as exc:
        return _fallback(handle, str(exc), answering=False)
    except transport.Unreachable as exc:
        return _fallback(handle, str(exc))
    if status == 200 and isinstance(body, dict) and body.get("event") == "done":
        return _visible_path(body["entry"]["path"], body["entry"].get("relpath", ""))
    if status == 200 and not (isinstance(body, dict) and body.get("event") == "error"):
        raise HubdClientError(
            "incomplete_answer", "the daemon's answer ended without a result", "see the daemon's log"
        )
    error = body.get("error", {}) if isinstance(body, dict) else {}
    raise HubdClientError(
        str(error.get("code", "error")),
        str(error.get("message", f"hubd answered HTTP {status}")),
        str(error.get("hint", "")),
    )


def offline_wanted() -> bool:
    """HUBD_OFFLINE=1 in this process: it never causes a download, even through a daemon that is online (as
    HF_HUB_OFFLINE does); cached models still resolve, others fail with `not_cached`."""
    return os.environ.get("HUBD_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _visible_path(path: str, relpath: str) -> str:
    """The daemon's path if this process sees it; else the same entry under our own mount of the cache."""
    if os.path.isdir(path):
        return path
    cache_dir = os.environ.get("HUBD_CACHE_DIR")
    if cache_dir and relpath:
        mapped = os.path.join(cache_dir, relpath)
        if os.path.isdir(mapped):
            return mapped
    raise HubdClientError(
        "path_not_visible",
        f"the daemon's path {path} does not exist in this process's filesystem",
        "in a container, mount the host's cache read-only and set HUBD_CACHE_DIR to where it is mounted",
    )


def _fallback(handle: str, why: str, answering: bool = True) -> str:
    from hubd_client.offline import lookup

    path, looked_in = lookup(handle)
    if path is not None:
        return path
    if not answering:
        raise DaemonUnavailable(
            "daemon_not_answering",
            f"the hubd daemon at {transport.where()} does not answer ({why}) "
            f"and {handle} is not in the cache at {looked_in}",
            "see the daemon's log, or restart it (`systemctl restart hubd`); HUBD_CLIENT_TIMEOUT and "
            "HUBD_CLIENT_CONNECT_TIMEOUT set how many seconds the client waits",
        )
    raise DaemonUnavailable(
        "daemon_unavailable",
        f"the hubd daemon is not running (nothing answers at {transport.where()}: {why}) "
        f"and {handle} is not in the cache at {looked_in}",
        "start it with `hubd serve` (or `systemctl start hubd`), or set HUBD_SOCKET / HUBD_URL to where it runs",
    )
