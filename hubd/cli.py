"""`hubd ...`: thin commands. Results on stdout, progress and errors on stderr.

Where a daemon answers on the socket (or HUBD_URL), commands go through its API, so it stays the only writer
of a shared cache. With no daemon, they run the engine in-process, but only on a cache the user owns.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from hubd_client.handles import parse_handle
from hubd_client.paths import SYSTEM_SOCKET
from hubd_client.resolver import offline_wanted

from hubd import __version__
from hubd.api_client import DaemonClient, error_from
from hubd.audit import ACTIONS, AuditLog, parse_time, uid_of, user_name
from hubd.config import Settings, effective, load_settings, parse_size
from hubd.engine import Engine
from hubd.entry import Entry
from hubd.errors import BadRequest, HubdError, UnknownModel
from hubd.manifest import load_manifest
from hubd.prefetch import resolve_many
from hubd.progress import ProgressBar, ProgressBoard, human_bytes
from hubd.server.logs import LEVELS

_ID_PREFIX = re.compile(r"[0-9a-f]{8,64}")


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


async def _run(
    args: argparse.Namespace,
    via_daemon: Callable[[DaemonClient], Awaitable[int]],
    in_process: Callable[[Engine], Awaitable[int]],
    force_local: bool = False,
    daemon_required: bool = False,
) -> int:
    settings = settings_from(args)
    candidates = _daemon_candidates(settings)
    if not force_local:
        for candidate in candidates:
            async with DaemonClient(candidate) as client:
                if await client.is_running():
                    args.used = f"the daemon at {candidate.url or f'unix:{candidate.socket}'}"
                    _refuse_unhonoured(args, args.used)
                    return await via_daemon(client)
        if daemon_required:
            raise BadRequest(
                f"no hubd daemon answers at {_where(candidates)}",
                "start it (`hubd serve`, or `systemctl start hubd`), or pass --no-daemon to fetch in this process",
            )
    _check_owner(settings)
    engine = Engine(settings)
    await engine.start()
    args.used = f"the cache {settings.cache_dir}, in this process"
    if not force_local:
        print(
            f"note: no hubd daemon answers at {_where(candidates)}; working in this process on the cache "
            f"{settings.cache_dir}",
            file=sys.stderr,
        )
    try:
        return await in_process(engine)
    finally:
        await engine.close()


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
    if settings.url or "socket" in settings.model_fields_set or settings.socket == SYSTEM_SOCKET:
        return [settings]
    return [settings, settings.model_copy(update={"socket": SYSTEM_SOCKET})]


def _where(candidates: list[Settings]) -> str:
    return " or ".join(s.url or f"unix:{s.socket}" for s in candidates)


def _check_owner(settings: Settings) -> None:
    """The in-process engine may only write a cache the user owns; a shared cache belongs to its daemon."""
    root = settings.cache_dir
    if root.exists() and root.stat().st_uid != os.geteuid():
        where = settings.url or settings.socket
        raise BadRequest(
            f"the cache {root} belongs to another user and no hubd daemon answers at {where}",
            "start the daemon (`systemctl start hubd`), or set HUBD_CACHE_DIR to a cache of your own",
        )


async def _stream_into_bar(events: AsyncIterator[Any], bar: ProgressBar) -> Entry:
    async for event in events:
        data = event if isinstance(event, dict) else event.model_dump()
        if data["event"] == "progress":
            bar(data["phase"], data["done"], data["total"])
        elif data["event"] == "done":
            return Entry.model_validate(data["entry"])
        elif data["event"] == "error":
            raise error_from(data)
    raise HubdError("the daemon ended the stream without a result", "see the daemon's log")


# -- commands ---------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from hubd.server.daemon import serve

    return serve(settings_from(args), args.log_level)


def _offline(args: argparse.Namespace) -> bool:
    """`--offline` or HUBD_OFFLINE=1: this command never causes a download, even through an online daemon."""
    return bool(args.offline) or offline_wanted()


def _pull(args: argparse.Namespace) -> int:
    if args.json:
        return _pull_ndjson(args)
    bar = ProgressBar(args.handle, quiet=args.quiet)

    async def via_daemon(client: DaemonClient) -> int:
        body = {"handle": args.handle, "sha256": args.sha256, "offline": _offline(args)}
        entry = await _stream_into_bar(client.stream("/v1/pull", body), bar)
        bar.close()  # before the path: on a terminal it must not land on the bar's line
        print(entry.path)
        return 0

    async def in_process(engine: Engine) -> int:
        entry = await engine.resolve(args.handle, sha256=args.sha256, on_progress=bar, uid=os.getuid())
        bar.close()
        print(entry.path)
        return 0

    try:
        return asyncio.run(_run(args, via_daemon, in_process))
    finally:
        bar.close()


def _pull_ndjson(args: argparse.Namespace) -> int:
    """The API's own events, one JSON object a line, as they happen."""

    async def via_daemon(client: DaemonClient) -> int:
        body = {"handle": args.handle, "sha256": args.sha256, "offline": _offline(args)}
        async for event in client.stream("/v1/pull", body):
            if event["event"] == "error":
                raise error_from(event)
            print(json.dumps(event), flush=True)
        return 0

    async def in_process(engine: Engine) -> int:
        def progress(phase: str, done: int, total: int | None) -> None:
            print(json.dumps({"event": "progress", "phase": phase, "done": done, "total": total}), flush=True)

        entry = await engine.resolve(args.handle, sha256=args.sha256, on_progress=progress, uid=os.getuid())
        print(json.dumps({"event": "done", "entry": entry.model_dump(mode="json")}))
        return 0

    return asyncio.run(_run(args, via_daemon, in_process))


def _prefetch(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest_file)  # errors point at the entry before anything is sent
    board = ProgressBoard([m.handle for m in manifest.model], quiet=args.quiet or args.json)
    results: dict[str, str] = {}

    async def consume(events: AsyncIterator[Any]) -> int:
        failed = 0
        async for event in events:
            data = event if isinstance(event, dict) else event.model_dump(mode="json")
            if args.json:
                print(json.dumps(data), flush=True)
            if data["event"] == "progress":
                board.update(data["handle"], data["phase"], data["done"], data["total"])
            elif data["event"] == "done":
                entry = data["entry"]
                results[data["handle"]] = f"ok      {human_bytes(entry['size_bytes']):>10}  {entry['path']}"
                board.finish(data["handle"], "done")
            elif data["event"] == "error":
                failed += 1
                results[data["handle"]] = f"FAILED  {data['error']['message']} (hint: {data['error']['hint']})"
                board.finish(data["handle"], "failed")
        return failed

    source = str(args.manifest_file.resolve())

    async def via_daemon(client: DaemonClient) -> int:
        return await consume(client.stream("/v1/prefetch", {**manifest.model_dump(), "source": source}))

    async def in_process(engine: Engine) -> int:
        engine.claim_aliases(source, [(m.name, m.handle, m.sha256) for m in manifest.model])
        return await consume(resolve_many(engine, manifest.model, uid=os.getuid(), source=source))

    try:
        failed = asyncio.run(
            _run(args, via_daemon, in_process, force_local=args.no_daemon, daemon_required=not args.no_daemon)
        )
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
    only = uid_of(args.user) if args.user else None

    def show(entries: list[Entry]) -> int:
        entries = sorted(entries, key=lambda e: e.fetched_at)
        if only is not None:
            entries = [e for e in entries if only in e.users]
        print(json.dumps([e.model_dump() for e in entries], indent=2) if args.json else _table(entries))
        return 0

    async def via_daemon(client: DaemonClient) -> int:
        return show(await client.entries())

    async def in_process(engine: Engine) -> int:
        return show(engine.list_entries())

    return asyncio.run(_run(args, via_daemon, in_process))


def _table(entries: list[Entry]) -> str:
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
    def show(results: list[dict[str, Any]]) -> int:
        if args.json:
            print(json.dumps({"results": results}, indent=2))
            return 1 if any(r["problems"] and not r["healed"] for r in results) else 0
        unhealthy = 0
        for result in results:
            name = ", ".join(result["handles"]) or result["id"]
            if not result["problems"]:
                print(f"ok      {result['id'][:12]}  {name}")
                continue
            status = "healed" if result["healed"] else "BROKEN"
            unhealthy += 0 if result["healed"] else 1
            print(f"{status:<7} {result['id'][:12]}  {name}")
            for problem in result["problems"]:
                print(f"          {problem}")
        return 1 if unhealthy else 0

    async def via_daemon(client: DaemonClient) -> int:
        return show(await client.verify(args.handle, heal=not args.no_heal))

    async def in_process(engine: Engine) -> int:
        reports = await engine.verify(args.handle, heal=not args.no_heal)
        return show(
            [
                {"id": r.entry.id, "handles": r.entry.handles, "problems": r.problems, "healed": r.healed}
                for r in reports
            ]
        )

    return asyncio.run(_run(args, via_daemon, in_process))


def _rm(args: argparse.Namespace) -> int:
    def report(entry: Entry) -> int:
        if args.json:
            print(entry.model_dump_json(indent=2))
            return 0
        print(f"removed {entry.id[:12]} ({human_bytes(entry.size_bytes)}): {', '.join(entry.handles)}")
        return 0

    async def via_daemon(client: DaemonClient) -> int:
        return report(await client.remove(await _model_id(client, args.handle), args.force))

    async def in_process(engine: Engine) -> int:
        return report(engine.remove(args.handle, uid=os.getuid(), force=args.force))

    return asyncio.run(_run(args, via_daemon, in_process))


async def _model_id(client: DaemonClient, handle: str) -> str:
    """The id the daemon knows a handle, alias or id (prefix) by."""
    if _ID_PREFIX.fullmatch(handle):  # the daemon resolves ids and id prefixes itself (Engine.find)
        return handle
    entries = await client.entries()
    for entry in entries:
        if handle in entry.aliases:
            return entry.id
    canonical = parse_handle(handle, frozenset(client.settings.http_hosts)).canonical
    for entry in entries:
        if canonical in entry.handles:
            return entry.id
    raise UnknownModel(f"no cached model matches {handle!r}", "see `hubd ls` for what is cached")


def _unpin(args: argparse.Namespace) -> int:
    def report(names: list[str]) -> int:
        if args.json:
            print(json.dumps({"handle": args.handle, "unpinned": bool(names), "pinned_by": names}))
            return 0
        if not names:
            print(f"{args.handle} was not pinned")
            return 0
        print(f"unpinned {args.handle} (was pinned by {'; '.join(names)})")
        print(
            "a manifest the daemon watches pins it again when it changes or the daemon restarts", file=sys.stderr
        )
        return 0

    async def via_daemon(client: DaemonClient) -> int:
        return report(await client.unpin(await _model_id(client, args.handle)))

    async def in_process(engine: Engine) -> int:
        return report(engine.unpin(engine.find(args.handle).digest, os.getuid()))

    return asyncio.run(_run(args, via_daemon, in_process))


def _gc(args: argparse.Namespace) -> int:
    def show(report: dict[str, Any]) -> int:
        if args.json:
            print(json.dumps(report, indent=2, default=str))
            return 0
        verb = "would free" if report["dry_run"] else "freed"
        for entry in report["removed"]:
            print(
                f"{'would remove' if report['dry_run'] else 'removed'} {entry['id'][:12]} "
                f"({human_bytes(entry['size_bytes'])}): {', '.join(entry['handles'])}"
            )
        print(
            f"{verb} {human_bytes(report['freed_bytes'] + report['quarantine_freed_bytes'])}; "
            f"cache {human_bytes(report['size_before'])} -> {human_bytes(report['size_after'])}; "
            f"kept {report['kept_pinned']} pinned, {report['kept_recent']} in use"
        )
        return 0

    async def via_daemon(client: DaemonClient) -> int:
        return show(await client.gc(args.dry_run, parse_size(args.max_size) if args.max_size else None))

    async def in_process(engine: Engine) -> int:
        report = await engine.gc(dry_run=args.dry_run)
        return show({**report.__dict__, "removed": [e.model_dump() for e in report.removed]})

    return asyncio.run(_run(args, via_daemon, in_process))


def _status(args: argparse.Namespace) -> int:
    def show(status: dict[str, Any]) -> int:
        if args.json:
            print(json.dumps({**status, "via": args.used}, indent=2))
            return 0
        quota = human_bytes(status["max_size"]) if status["max_size"] else "none"
        upstream = status["upstream"]
        print(f"via       {args.used}")
        print(f"cache     {status['cache_dir']}")
        print(f"size      {human_bytes(status['size_bytes'])} (quota {quota})")
        print(f"entries   {status['entries']} ok, {status['pinned']} pinned, {status['broken']} broken")
        print(
            f"upstream  {upstream['url']}: {'reachable' if upstream['reachable'] else 'UNREACHABLE'}"
            f" ({upstream['detail']})"
        )
        for usage in status.get("users", []):
            who = usage["user"] or f"uid {usage['uid']}"
            print(f"user      {who}: {human_bytes(usage['size_bytes'])} in {usage['entries']} models")
        return 0

    async def via_daemon(client: DaemonClient) -> int:
        return show(await client.status())

    async def in_process(engine: Engine) -> int:
        from hubd.server.routes import cache_status

        return show((await cache_status(engine)).model_dump(exclude={"next_cursor"}))

    return asyncio.run(_run(args, via_daemon, in_process))


def _audit(args: argparse.Namespace) -> int:
    query = {k: v for k in ("since", "until", "uid", "action") if (v := getattr(args, k))}
    for when in ("since", "until"):
        if when in query:
            parse_time(query[when])  # a bad time is refused here, in the user's words, before anything is sent
    query["limit"] = str(args.limit)

    def show(records: list[dict[str, Any]]) -> int:
        if args.json:
            print(json.dumps(records, indent=2))
            return 0
        for r in records:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
            who = r["user"] or (f"uid {r['uid']}" if r["uid"] is not None else "hubd")
            model = (r["model_id"] or "-")[:12]
            detail = f"  ({r['detail']})" if r["detail"] else ""
            print(
                f"{when}  {who:<12} {r['action']:<10} {model:<12} {r['outcome']:<8} {r['handle'] or '-'}{detail}"
            )
        return 0

    async def via_daemon(client: DaemonClient) -> int:
        return show(await client.audit(query))

    async def in_process(engine: Engine) -> int:
        records = list(
            AuditLog(engine.settings.cache_dir).read(
                since=parse_time(query["since"]) if "since" in query else None,
                until=parse_time(query["until"]) if "until" in query else None,
                uid=uid_of(query["uid"]) if "uid" in query else None,
                action=query.get("action"),
            )
        )
        return show([r.model_dump() for r in records[-args.limit :]] if args.limit > 0 else [])

    return asyncio.run(_run(args, via_daemon, in_process))


def _export(args: argparse.Namespace) -> int:
    from hubd.bundle import BundleEntry, plan_export, read_header, remove_partial, write_bundle

    wanted: list[tuple[str, str | None]] = [(handle, None) for handle in args.handles]
    if args.manifest is not None:
        wanted += [(m.handle, m.sha256) for m in load_manifest(args.manifest).model]
    if not wanted:
        raise BadRequest("nothing to export", "name handles, aliases or ids, or give --manifest FILE")
    bundle: Path = args.bundle
    partial = bundle.with_name(f".{bundle.name}.{os.getpid()}.partial")  # a failed export leaves no bundle

    async def via_daemon(client: DaemonClient) -> int:
        pins = [sha or "" for _handle, sha in wanted] if any(sha for _handle, sha in wanted) else []
        bar = ProgressBar(str(bundle), quiet=args.quiet or args.json)
        try:
            with open(partial, "wb") as out:
                await client.export_bundle([handle for handle, _sha in wanted], pins, out, bar)
        finally:
            bar.close()
        return 0

    async def in_process(engine: Engine) -> int:
        digests = []
        for handle, sha256 in wanted:
            if _ID_PREFIX.fullmatch(handle):
                digests.append(engine.find(handle).digest)
            else:
                digests.append((await engine.resolve(handle, sha256=sha256, uid=os.getuid())).id)
        header = plan_export(engine, digests)
        done = iter(range(1, len(header.entries) + 1))

        def exported(entry: BundleEntry) -> None:
            size, names = human_bytes(entry.size_bytes), ", ".join(ref.handle for ref in entry.refs)
            if not (args.quiet or args.json):  # progress: stderr, so stdout holds only the result
                print(
                    f"hubd: [{next(done)}/{len(header.entries)}] exported {entry.digest[:12]} ({size}) {names}",
                    file=sys.stderr,
                )

        with open(partial, "wb") as out:
            await asyncio.to_thread(write_bundle, engine, header, out, exported)
        return 0

    try:
        asyncio.run(_run(args, via_daemon, in_process))
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
    if args.json:
        models = [
            {"id": e.digest, "size_bytes": e.size_bytes, "handles": [ref.handle for ref in e.refs]}
            for e in header.entries
        ]
        print(json.dumps({"bundle": str(bundle), "size_bytes": bundle.stat().st_size, "models": models}, indent=2))
        return 0
    for entry in header.entries:
        names = ", ".join(ref.handle for ref in entry.refs)
        print(f"{entry.digest[:12]}  {human_bytes(entry.size_bytes):>10}  {names}")
    size = human_bytes(bundle.stat().st_size)
    print(f"hubd: wrote {bundle} ({size}, {len(header.entries)} models)", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    from hubd.bundle import ImportResult, describe, import_bundle

    results: list[ImportResult] = []

    def show(result: ImportResult) -> None:
        results.append(result)
        if args.json:
            print(json.dumps({"event": "entry", **result.model_dump(mode="json")}), flush=True)
            return
        print(describe(result), file=sys.stderr, flush=True)
        if result.ok:
            print(f"{result.digest}  {', '.join(result.handles)}", flush=True)

    async def via_daemon(client: DaemonClient) -> int:
        async for event in client.import_bundle(args.bundle):
            if event["event"] == "entry":
                show(ImportResult.model_validate(event))
            elif event["event"] == "error":
                raise error_from(event)
        return 0

    async def in_process(engine: Engine) -> int:
        with open(args.bundle, "rb") as stream:
            await asyncio.to_thread(import_bundle, engine, stream, os.getuid(), show)
        return 0

    if not args.bundle.is_file():
        raise BadRequest(f"no bundle at {args.bundle}", "give the file `hubd export` wrote")
    asyncio.run(_run(args, via_daemon, in_process))
    refused = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps({"event": "done", "imported": len(results) - len(refused), "refused": len(refused)}))
        return 1 if refused else 0
    for result in refused:
        print(f"hubd: error: {result.message}", file=sys.stderr)
    print(f"hubd: {len(results) - len(refused)} imported, {len(refused)} refused", file=sys.stderr)
    return 1 if refused else 0


def _config(args: argparse.Namespace) -> int:
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
