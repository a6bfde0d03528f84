"""`hubd ...`: thin commands around the engine. Results on stdout, progress and errors on stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hubd import __version__
from hubd.config import Settings, load_settings
from hubd.engine import Engine
from hubd.entry import Entry
from hubd.errors import HubdError
from hubd.progress import ProgressBar, human_bytes


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
    commands = parser.add_subparsers(dest="command", required=True)

    pull = commands.add_parser("pull", parents=[common], help="fetch a model if needed and print its path")
    pull.add_argument("handle")
    pull.add_argument("--sha256", help="expected sha256 of the archive; a mismatch is an error")
    pull.set_defaults(run=_pull)

    ls = commands.add_parser("ls", parents=[common], help="list cached models")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(run=_ls)

    verify = commands.add_parser("verify", parents=[common], help="re-hash cached models; heal broken ones")
    verify.add_argument("handle", nargs="?", help="a handle or id (default: every model)")
    verify.add_argument("--no-heal", action="store_true", help="report only; do not re-fetch")
    verify.set_defaults(run=_verify)

    rm = commands.add_parser("rm", parents=[common], help="remove a model from the cache")
    rm.add_argument("handle", help="a handle or id")
    rm.set_defaults(run=_rm)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(
        cache_dir=args.cache_dir, offline=args.offline, mirror=args.mirror, http_hosts=args.http_hosts
    )


async def _with_engine(args: argparse.Namespace, body: Callable[[Engine], Awaitable[int]]) -> int:
    engine = Engine(settings_from(args))
    await engine.start()
    try:
        return await body(engine)
    finally:
        await engine.close()


def _pull(args: argparse.Namespace) -> int:
    async def body(engine: Engine) -> int:
        bar = ProgressBar(args.handle)
        try:
            entry = await engine.resolve(args.handle, sha256=args.sha256, on_progress=bar)
        finally:
            bar.close()
        print(entry.path)
        return 0

    return asyncio.run(_with_engine(args, body))


def _ls(args: argparse.Namespace) -> int:
    async def body(engine: Engine) -> int:
        entries = sorted(engine.list_entries(), key=lambda e: e.fetched_at)
        if args.json:
            print(json.dumps([e.model_dump() for e in entries], indent=2))
        else:
            print(_table(entries))
        return 0

    return asyncio.run(_with_engine(args, body))


def _table(entries: list[Entry]) -> str:
    rows = [("ID", "SIZE", "STATE", "LAST USED", "HANDLES")]
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "-"
        rows.append((e.id[:12], human_bytes(e.size_bytes), e.state, used, ", ".join(e.handles)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) for row in rows)
    return "\n".join(f"{line}  {row[4]}" for line, row in zip(lines, rows, strict=True))


def _verify(args: argparse.Namespace) -> int:
    async def body(engine: Engine) -> int:
        reports = await engine.verify(args.handle, heal=not args.no_heal)
        unhealthy = 0
        for report in reports:
            name = ", ".join(report.entry.handles) or report.entry.id
            if not report.problems:
                print(f"ok      {report.entry.id[:12]}  {name}")
                continue
            status = "healed" if report.healed else "BROKEN"
            unhealthy += 0 if report.healed else 1
            print(f"{status:<7} {report.entry.id[:12]}  {name}")
            for problem in report.problems:
                print(f"          {problem}")
        return 1 if unhealthy else 0

    return asyncio.run(_with_engine(args, body))


def _rm(args: argparse.Namespace) -> int:
    async def body(engine: Engine) -> int:
        entry = engine.remove(args.handle)
        print(f"removed {entry.id[:12]} ({human_bytes(entry.size_bytes)}): {', '.join(entry.handles)}")
        return 0

    return asyncio.run(_with_engine(args, body))


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except HubdError as exc:
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(f"hubd: error: {exc.message}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hubd: interrupted; nothing partial was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
