"""`hubd ...`: thin commands. Results on stdout, progress and errors on stderr.

Where a daemon answers on the socket (or HUBD_URL), commands go through its API, so it stays the only writer
of a shared cache. With no daemon, they run the engine in-process, but only on a cache the user owns.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubd import __version__
from hubd.actions import ACTIONS
from hubd.errors import BadRequest, HubdError
from hubd.server.logs import LEVELS

if TYPE_CHECKING:
    from pydantic import BaseModel

    from hubd.backends import Backend
    from hubd.config import Settings
    from hubd.entry import Entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubd", description="A machine-wide cache of TF Hub / Kaggle models.")
    parser.add_argument("--version", action="version", version=f"hubd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", help="cache root (default ~/.cache/hubd; env HUBD_CACHE_DIR)")
    common.add_argument("--offline", action="store_true", default=None, help="never touch the network")
    common.add_argument("--mirror", help="hosting-protocol server for tfhub.dev/Kaggle handles (env HUBD_MIRROR)")
    common.add_argument(
        "--http-host", action="append", dest="http_hosts", help="allow plain http to this host (repeatable)"
    )
    common.add_argument("--socket", help="the daemon's Unix socket (env HUBD_SOCKET)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines on stderr")
    common.add_argument(
        "--token-file", help="admin token: serve checks it, commands send it over TCP (env HUBD_TOKEN_FILE)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--listen", action="append", help="also serve on loopback TCP, e.g. 127.0.0.1:8750")
    serve.add_argument("--manifest", action="append", help="prefetch this manifest and watch it (repeatable)")
    serve.add_argument("--admin-group", help="members of this group may delete models")
    serve.add_argument("--max-size", help="quota for cached models, e.g. 50G; least recently used go first")
    serve.add_argument(
        "--mirror-listen", action="append", help="serve the TF Hub hosting protocol to other machines on HOST:PORT"
    )
    serve.add_argument("--mirror-key-file", help="shared key file a LAN mirror signs its checksum claims with")
    serve.add_argument(
        "--object-store", help="s3://BUCKET/PREFIX shared by hubd hosts (env HUBD_OBJECT_STORE; AWS_* variables)"
    )
    serve.add_argument(
        "--trust-foreign-namespaces",
        action="store_true",
        default=None,
        help="let root or admins in another user or PID namespace (a container) act as admins",
    )
    serve.add_argument("--socket-group", help="group that may use the socket (mode 0660)")
    serve.add_argument(
        "--log-level", choices=LEVELS, help="debug adds an access log (default info; env HUBD_LOG_LEVEL)"
    )
    serve.set_defaults(run=_serve)

    pull = commands.add_parser("pull", parents=[common], help="fetch a model if needed and print its path")
    pull.add_argument("handle")
    pull.add_argument("--sha256", help="expected sha256 of the archive; a mismatch is an error")
    pull.add_argument("--json", action="store_true", help="NDJSON on stdout: progress events, then the result")
    pull.set_defaults(run=_pull)

    prefetch = commands.add_parser("prefetch", parents=[common], help="fetch every model of a manifest")
    prefetch.add_argument("manifest_file", type=Path, metavar="MANIFEST", help="TOML or JSON manifest")
    prefetch.add_argument("--no-daemon", action="store_true", help="run the engine in this process")
    prefetch.add_argument("--json", action="store_true", help="NDJSON on stdout: every model's events")
    prefetch.set_defaults(run=_prefetch)

    ls = commands.add_parser("ls", parents=[common], help="list cached models")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--user", help="only models this user (name or uid) asked for")
    ls.set_defaults(run=_ls)

    verify = commands.add_parser("verify", parents=[common], help="re-hash cached models; heal broken ones")
    verify.add_argument("handle", nargs="?", help="a handle or id (default: every model)")
    verify.add_argument("--no-heal", action="store_true", help="report only; do not re-fetch")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(run=_verify)

    gc = commands.add_parser("gc", parents=[common], help="evict to fit the quota; drop orphans and quarantine")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    gc.add_argument("--max-size", help="size to collect down to, e.g. 40G (default: the quota, HUBD_MAX_SIZE)")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    gc.set_defaults(run=_gc)

    status = commands.add_parser("status", parents=[common], help="cache size, entries, pins, upstream")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_status)

    rm = commands.add_parser("rm", parents=[common], help="remove a model from the cache")
    rm.add_argument("handle", help="a handle, alias or id")
    rm.add_argument("--force", action="store_true", help="remove it even when a manifest pins it")
    rm.add_argument("--json", action="store_true", help="machine-readable output")
    rm.set_defaults(run=_rm)

    unpin = commands.add_parser("unpin", parents=[common], help="let eviction remove a pinned model again")
    unpin.add_argument("handle", help="a handle, alias or id")
    unpin.add_argument("--json", action="store_true", help="machine-readable output")
    unpin.set_defaults(run=_unpin)

    export = commands.add_parser(
        "export", parents=[common], help="write models into one bundle file, for a machine without network"
    )
    export.add_argument("bundle", type=Path, metavar="BUNDLE", help="the file to write (an uncompressed tar)")
    export.add_argument("handles", nargs="*", metavar="HANDLE", help="a handle, alias or id")
    export.add_argument("--manifest", type=Path, help="also every model of this manifest (TOML or JSON)")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    export.set_defaults(run=_export)

    import_ = commands.add_parser(
        "import", parents=[common], help="publish the models of a bundle, each checked against its digest"
    )
    import_.add_argument("bundle", type=Path, metavar="BUNDLE", help="a file `hubd export` wrote")
    import_.add_argument("--json", action="store_true", help="NDJSON on stdout: one event per model, then done")
    import_.set_defaults(run=_import)

    audit = commands.add_parser("audit", parents=[common], help="who deleted, evicted, pinned or imported what")
    audit.add_argument("--since", help="from this time (epoch seconds or ISO 8601, e.g. 2026-11-26T09:00)")
    audit.add_argument("--until", help="up to this time")
    audit.add_argument("--uid", help="only this user (name or uid)")
    audit.add_argument("--action", choices=ACTIONS, help="only this action")
    audit.add_argument("--limit", type=int, default=10000, help="the most recent N records (default 10000)")
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    audit.set_defaults(run=_audit)

    config = commands.add_parser(
        "config",
        parents=[common],
        help="every effective setting and where it came from (flag, env, file, default)",
    )
    config.add_argument("--json", action="store_true", help="machine-readable output")
    config.set_defaults(run=_config)

    completion = commands.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(run=_completion)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    from hubd.config import load_settings  # pydantic-settings: not for --help, --version or completion

    return load_settings(**flags_from(args))


def flags_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gives (None: not given)."""
    extra: dict[str, Any] = {}
    for name in (
        "listen",
        "manifest",
        "admin_group",
        "token_file",
        "max_size",
        "mirror_listen",
        "mirror_key_file",
        "object_store",
        "trust_foreign_namespaces",
        "socket_group",
    ):
        value = getattr(args, name, None)
        if value is not None:
            extra["manifests" if name == "manifest" else name] = value
    return dict(
        cache_dir=args.cache_dir,
        offline=args.offline,
        mirror=args.mirror,
        http_hosts=args.http_hosts,
        socket=args.socket,
        **extra,
    )


# -- choosing daemon or engine ----------------------------------------------------------------------


@contextmanager
def _backend(
    args: argparse.Namespace, force_local: bool = False, daemon_required: bool = False
) -> Iterator[Backend]:
    """The daemon that answers (refusing flags it cannot honour), else the engine in this process."""
    from hubd.backends import DaemonBackend, LocalBackend

    settings = settings_from(args)
    candidates = _daemon_candidates(settings)
    backend: Backend | None = None
    if not force_local:
        backend = DaemonBackend.find(candidates)
        if backend is not None:
            _refuse_unhonoured(args, backend.via)
        elif daemon_required:
            raise BadRequest(
                f"no hubd daemon answers at {_where(candidates)}",
                "start it (`hubd serve`, or `systemctl start hubd`), or pass --no-daemon to fetch in this process",
            )
    if backend is None:
        backend = LocalBackend(settings)
        if not force_local:
            print(
                f"note: no hubd daemon answers at {_where(candidates)}; working in this process on the cache "
                f"{settings.cache_dir}",
                file=sys.stderr,
            )
    args.used = backend.via
    gc.freeze()  # start-up is over: what it imported is never garbage, so no collection walks it again
    try:
        yield backend
    finally:
        backend.close()


#: Flags that change how this process would fetch: a daemon fetches with its own settings, so they cannot apply.
_DAEMONS_OWN = (
    ("cache_dir", "--cache-dir", "the daemon serves its own cache (`hubd status` names it)"),
    ("mirror", "--mirror", "the daemon's admin sets its mirror (HUBD_MIRROR in its unit or config file)"),
    ("http_hosts", "--http-host", "the daemon's admin sets plain-http hosts (HUBD_HTTP_HOSTS)"),
)


def _refuse_unhonoured(args: argparse.Namespace, daemon: str) -> None:
    """Refuse a flag the daemon cannot honour rather than ignore it."""
    for dest, flag, why in _DAEMONS_OWN:
        if getattr(args, dest, None):
            raise BadRequest(
                f"{flag} cannot apply: {daemon} answers, and it fetches with its own settings",
                f"drop {flag}; {why}. To work without the daemon, point --socket at a path where none listens",
            )


def _daemon_candidates(settings: Settings) -> list[Settings]:
    """Where to look for a daemon: the one configured (--socket, HUBD_SOCKET, HUBD_URL, the config file); with
    none, the user's own daemon, then the system daemon."""
    from hubd_client.paths import SYSTEM_SOCKET

    if settings.url or "socket" in settings.model_fields_set or settings.socket == SYSTEM_SOCKET:
        return [settings]
    return [settings, settings.model_copy(update={"socket": SYSTEM_SOCKET})]


def _where(candidates: list[Settings]) -> str:
    return " or ".join(s.url or f"unix:{s.socket}" for s in candidates)


# -- rendering: a table for people, the API's JSON with --json ----------------------------------------


def _render(args: argparse.Namespace, data: Any, table: Callable[[], None]) -> None:
    """Once per command: `data` (plain JSON values) with --json, else `table()` prints for people."""
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        table()


def _print_event(event: BaseModel) -> None:
    """One NDJSON line of a stream, as the API sends it."""
    print(json.dumps(event.model_dump(mode="json")), flush=True)


# -- commands ---------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from hubd.server.daemon import serve

    return serve(settings_from(args), args.log_level)


def _offline(args: argparse.Namespace) -> bool:
    """`--offline` or HUBD_OFFLINE=1: this command never causes a download, even through an online daemon."""
    from hubd_client.resolver import offline_wanted

    return bool(args.offline) or offline_wanted()


def _pull(args: argparse.Namespace) -> int:
    from hubd.events import DoneEvent, ProgressEvent
    from hubd.progress import ProgressBar

    bar = ProgressBar(args.handle, quiet=args.quiet or args.json)

    def progress(event: ProgressEvent) -> None:
        if args.json:  # NDJSON: the API's own events, as they happen
            _print_event(event)
        else:
            bar(event.phase, event.done, event.total)

    try:
        with _backend(args) as backend:
            entry = backend.pull(args.handle, args.sha256, _offline(args), progress)
    finally:
        bar.close()  # before the path: on a terminal it must not land on the bar's line
    if args.json:
        _print_event(DoneEvent(event="done", handle=args.handle, entry=entry))
    else:
        print(entry.path)
    return 0


def _prefetch(args: argparse.Namespace) -> int:
    from hubd.backends import Event
    from hubd.events import DoneEvent, ErrorEvent, ProgressEvent
    from hubd.manifest import load_manifest
    from hubd.progress import ProgressBoard, human_bytes

    manifest = load_manifest(args.manifest_file)  # errors point at the entry before anything is sent
    board = ProgressBoard([m.handle for m in manifest.model], quiet=args.quiet or args.json)
    results: dict[str, str] = {}
    failed = 0

    def show(event: Event) -> None:
        nonlocal failed
        if args.json:
            _print_event(event)
        if isinstance(event, ProgressEvent):
            board.update(event.handle, event.phase, event.done, event.total)
        elif isinstance(event, DoneEvent):
            results[event.handle] = f"ok      {human_bytes(event.entry.size_bytes):>10}  {event.entry.path}"
            board.finish(event.handle, "done")
        elif isinstance(event, ErrorEvent):
            failed += 1
            results[event.handle] = f"FAILED  {event.error.message} (hint: {event.error.hint})"
            board.finish(event.handle, "failed")

    source = str(args.manifest_file.resolve())
    try:
        with _backend(args, force_local=args.no_daemon, daemon_required=not args.no_daemon) as backend:
            backend.prefetch(manifest, source, show)
    finally:
        board.close()
    if args.json:
        return 1 if failed else 0
    width = max((len(h) for h in results), default=0)
    for handle in (m.handle for m in manifest.model):
        print(f"{handle:<{width}}  {results.get(handle, 'FAILED  no result')}")
    print(f"{len(results) - failed} ok, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _ls(args: argparse.Namespace) -> int:
    from hubd.audit import uid_of

    only = uid_of(args.user) if args.user else None
    with _backend(args) as backend:
        entries = sorted(backend.models(), key=lambda e: e.fetched_at)
    if only is not None:
        entries = [e for e in entries if only in e.users]
    _render(args, [e.model_dump() for e in entries], lambda: print(_table(entries)))
    return 0


def _table(entries: list[Entry]) -> str:
    from hubd.audit import user_name
    from hubd.progress import human_bytes

    rows = [("ID", "SIZE", "STATE", "LAST USED", "USERS", "ALIASES", "HANDLES")]
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "-"
        state = e.state + (",pinned" if e.pinned else "")
        users = ",".join(user_name(uid) or str(uid) for uid in e.users) or "-"
        aliases = ",".join(e.aliases) or "-"
        rows.append((e.id[:12], human_bytes(e.size_bytes), state, used, users, aliases, ", ".join(e.handles)))
    last = len(rows[0]) - 1
    widths = [max(len(row[i]) for row in rows) for i in range(last)]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) for row in rows)
    return "\n".join(f"{line}  {row[last]}" for line, row in zip(lines, rows, strict=True))


def _verify(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        results = backend.verify(args.handle, heal=not args.no_heal)

    def table() -> None:
        for result in results:
            name = ", ".join(result.handles) or result.id
            if not result.problems:
                print(f"ok      {result.id[:12]}  {name}")
                continue
            print(f"{'healed' if result.healed else 'BROKEN':<7} {result.id[:12]}  {name}")
            for problem in result.problems:
                print(f"          {problem}")

    _render(args, {"results": [r.model_dump() for r in results]}, table)
    return 1 if any(r.problems and not r.healed for r in results) else 0


def _rm(args: argparse.Namespace) -> int:
    from hubd.progress import human_bytes

    with _backend(args) as backend:
        entry = backend.remove(args.handle, args.force)
    _render(
        args,
        entry.model_dump(),
        lambda: print(f"removed {entry.id[:12]} ({human_bytes(entry.size_bytes)}): {', '.join(entry.handles)}"),
    )
    return 0


def _unpin(args: argparse.Namespace) -> int:
    with _backend(args) as backend:
        names = backend.unpin(args.handle).unpinned

    def table() -> None:
        if not names:
            print(f"{args.handle} was not pinned")
            return
        print(f"unpinned {args.handle} (was pinned by {'; '.join(names)})")
        print(
            "a manifest the daemon watches pins it again when it changes or the daemon restarts", file=sys.stderr
        )

    _render(args, {"handle": args.handle, "unpinned": bool(names), "pinned_by": names}, table)
    return 0


def _gc(args: argparse.Namespace) -> int:
    from hubd.config import parse_size
    from hubd.progress import human_bytes

    with _backend(args) as backend:
        report = backend.gc(args.dry_run, parse_size(args.max_size) if args.max_size else None)

    def table() -> None:
        for entry in report.removed:
            print(
                f"{'would remove' if report.dry_run else 'removed'} {entry.id[:12]} "
                f"({human_bytes(entry.size_bytes)}): {', '.join(entry.handles)}"
            )
        print(
            f"{'would free' if report.dry_run else 'freed'} "
            f"{human_bytes(report.freed_bytes + report.quarantine_freed_bytes)}; "
            f"cache {human_bytes(report.size_before)} -> {human_bytes(report.size_after)}; "
            f"kept {report.kept_pinned} pinned, {report.kept_recent} in use"
        )

    _render(args, report.model_dump(), table)
    return 0


def _status(args: argparse.Namespace) -> int:
    from hubd.progress import human_bytes

    with _backend(args) as backend:
        status = backend.status()

    def table() -> None:
        quota = human_bytes(status.max_size) if status.max_size else "none"
        upstream = status.upstream
        print(f"via       {args.used}")
        print(f"cache     {status.cache_dir}")
        print(f"size      {human_bytes(status.size_bytes)} (quota {quota})")
        print(f"entries   {status.entries} ok, {status.pinned} pinned, {status.broken} broken")
        print(
            f"upstream  {upstream.url}: {'reachable' if upstream.reachable else 'UNREACHABLE'} ({upstream.detail})"
        )
        for usage in status.users:
            who = usage.user or f"uid {usage.uid}"
            print(f"user      {who}: {human_bytes(usage.size_bytes)} in {usage.entries} models")

    _render(args, {**status.model_dump(exclude={"next_cursor"}), "via": args.used}, table)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from hubd.audit import parse_time
    from hubd.backends import AuditQuery

    for when in (args.since, args.until):
        if when:
            parse_time(when)  # a bad time is refused here, in the user's words, before anything is sent
    query = AuditQuery(
        since=args.since or None,
        until=args.until or None,
        uid=args.uid or None,
        action=args.action or None,
        limit=args.limit,
    )
    with _backend(args) as backend:
        records = [r.model_dump() for r in backend.audit(query)]

    def table() -> None:
        for r in records:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
            who = r["user"] or (f"uid {r['uid']}" if r["uid"] is not None else "hubd")
            model = (r["model_id"] or "-")[:12]
            detail = f"  ({r['detail']})" if r["detail"] else ""
            print(
                f"{when}  {who:<12} {r['action']:<10} {model:<12} {r['outcome']:<8} {r['handle'] or '-'}{detail}"
            )

    _render(args, records, table)
    return 0


def _export(args: argparse.Namespace) -> int:
    from hubd.backends import ExportProgress
    from hubd.bundle import BundleEntry, read_header, remove_partial
    from hubd.manifest import load_manifest
    from hubd.progress import ProgressBar, human_bytes

    wanted: list[tuple[str, str | None]] = [(handle, None) for handle in args.handles]
    if args.manifest is not None:
        wanted += [(m.handle, m.sha256) for m in load_manifest(args.manifest).model]
    if not wanted:
        raise BadRequest("nothing to export", "name handles, aliases or ids, or give --manifest FILE")
    bundle: Path = args.bundle
    partial = bundle.with_name(f".{bundle.name}.{os.getpid()}.partial")  # a failed export leaves no bundle
    bar = ProgressBar(str(bundle), quiet=args.quiet or args.json)

    def exported(entry: BundleEntry, done: int, total: int) -> None:
        size, names = human_bytes(entry.size_bytes), ", ".join(ref.handle for ref in entry.refs)
        if not (args.quiet or args.json):  # progress: stderr, so stdout holds only the result
            print(f"hubd: [{done}/{total}] exported {entry.digest[:12]} ({size}) {names}", file=sys.stderr)

    try:
        try:
            with _backend(args) as backend, open(partial, "wb") as out:
                backend.export(wanted, out, ExportProgress(received=bar, exported=exported))
        finally:
            bar.close()
        header = read_header(partial)
        os.replace(partial, bundle)
    except OSError as exc:
        remove_partial(partial)
        raise BadRequest(
            f"cannot write the bundle {bundle}: {exc.strerror or exc}", "choose another place"
        ) from None
    except BaseException:
        remove_partial(partial)
        raise

    def table() -> None:
        for entry in header.entries:
            names = ", ".join(ref.handle for ref in entry.refs)
            print(f"{entry.digest[:12]}  {human_bytes(entry.size_bytes):>10}  {names}")
        size = human_bytes(bundle.stat().st_size)
        print(f"hubd: wrote {bundle} ({size}, {len(header.entries)} models)", file=sys.stderr)

    models = [
        {"id": e.digest, "size_bytes": e.size_bytes, "handles": [ref.handle for ref in e.refs]}
        for e in header.entries
    ]
    _render(args, {"bundle": str(bundle), "size_bytes": bundle.stat().st_size, "models": models}, table)
    return 0


def _import(args: argparse.Namespace) -> int:
    from hubd.bundle import ImportResult, describe

    results: list[ImportResult] = []

    def show(result: ImportResult) -> None:
        results.append(result)
        if args.json:
            print(json.dumps({"event": "entry", **result.model_dump(mode="json")}), flush=True)
            return
        print(describe(result), file=sys.stderr, flush=True)
        if result.ok:
            print(f"{result.digest}  {', '.join(result.handles)}", flush=True)

    if not args.bundle.is_file():
        raise BadRequest(f"no bundle at {args.bundle}", "give the file `hubd export` wrote")
    with _backend(args) as backend:
        backend.import_bundle(args.bundle, show)
    refused = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps({"event": "done", "imported": len(results) - len(refused), "refused": len(refused)}))
        return 1 if refused else 0
    for result in refused:
        print(f"hubd: error: {result.message}", file=sys.stderr)
    print(f"hubd: {len(results) - len(refused)} imported, {len(refused)} refused", file=sys.stderr)
    return 1 if refused else 0


def _config(args: argparse.Namespace) -> int:
    from hubd.config import effective

    settings = settings_from(args)
    rows = effective(settings, flags_from(args))
    if args.json:
        json.dump([{**vars(row), "value": _plain(row.value)} for row in rows], sys.stdout, indent=2)
        print()
        return 0
    table = [("VARIABLE (TOML KEY: lower case, no HUBD_)", "SOURCE", "VALUE")]
    table += [(row.env, row.source, _shown(row.value)) for row in rows]
    widths = [max(len(cells[i]) for cells in table) for i in range(2)]
    for name, source, value in table:
        print(f"{name.ljust(widths[0])}  {source.ljust(widths[1])}  {value}")
    return 0


def _completion(args: argparse.Namespace) -> int:
    """`source <(hubd completion bash)`, or `hubd completion zsh > "${fpath[1]}/_hubd"`."""
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except HubdError as exc:
        if getattr(args, "json", False):  # the API's error body (and its stream event, for NDJSON commands)
            streamed = {"event": "error"} if args.command in ("pull", "prefetch", "import") else {}
            print(json.dumps({**streamed, "error": exc.as_dict()}))
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(f"hubd: error: {exc.message}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hubd: interrupted; nothing partial was published", file=sys.stderr)
        return 130
    except OSError as exc:  # an operational mistake (permissions, a missing directory, a port in use): one line
        message, hint = _os_error(exc)
        print(f"hubd: error: {message} (hint: {hint})", file=sys.stderr)
        return 1


_OS_HINTS = {
    errno.EACCES: "check who owns it and its mode (`ls -ld`), run as that user, or choose another place "
    "(--cache-dir, --socket; HUBD_CACHE_DIR, HUBD_SOCKET)",
    errno.ENOENT: "create the missing directory, or fix the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
    errno.EROFS: "the file system is read-only: choose a writable place (--cache-dir, HUBD_CACHE_DIR)",
    errno.ENOSPC: "free space on that disk (`hubd gc`, `hubd rm`), or choose another place",
    errno.EADDRINUSE: "another process listens there: stop it, or choose another --listen / --socket",
}
_OS_HINTS[errno.EPERM] = _OS_HINTS[errno.EACCES]


def _os_error(exc: OSError) -> tuple[str, str]:
    """(message, hint) for an error the system reported, naming the path it was about."""
    what = exc.strerror or str(exc)
    where = f": {exc.filename}" if exc.filename else ""
    return f"{what}{where}", _OS_HINTS.get(exc.errno or 0, "see the path and the reason it names")


if __name__ == "__main__":
    raise SystemExit(main())
